"""Quantized weights and the modules that replace `nn.Linear` / `nn.Embedding` in a built model.

`Int8Weight` and `Int4Weight` hold one quantized [out, in] matrix. They are not tensors, but they stand in for one
where model code touches a weight directly: `.dtype` is the compute dtype, `.device` and `.shape` are the
weight's, and `F.linear(x, w, b)` / `F.embedding(ids, w)` dispatch to them (through `__torch_function__`).
That keeps the model files untouched: Falcon-Mamba's `F.linear(dt, self.dt_proj.weight)` and the caches' "dtype
of the embedding" work on a quantized model as they do on a float one.

Each weight has two paths for `linear`:

* the reference path: dequantize to the compute dtype, then `F.linear` (any device, any batch);
* the fast path: on CPU, the C kernels of `gyrfalcon.kernels.cpu` (matrix-vector for up to 8 rows; above that,
  rows of the weight are dequantized a tile at a time into fp32 and multiplied with torch's matmul); on CUDA,
  bitsandbytes' kernels when it is installed (see `cuda.py`), else the reference path.

`set_backend("reference")` (or `GYRFALCON_QUANT_BACKEND=reference`) forces the reference path everywhere.

State-dict names: a quantized module stores its matrix under the float module's name (`<module>.weight`, int8
or packed uint8) plus `<module>.weight_<part>` tensors, so a quantized checkpoint lists the same modules as the
float one. Tied weights (embedding and output head) are one object; the head then stores nothing of its own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import int4, int8

_BACKEND = os.environ.get("GYRFALCON_QUANT_BACKEND", "auto")
_DECODE_ROWS = 8  # at most this many input rows go through the matrix-vector kernels
_TILE_BYTES = 4 << 20  # fp32 bytes of one dequantized tile (prefill path): measured best of 1-16 MiB here
_TILE_BYTES_BF16 = 2 << 20  # the same for bf16 tiles
# Prefill product (more than 8 rows): "fp32" tiles (exact weights, fp32 matmul), "bf16" tiles (weights and
# activations rounded to bf16, fp32 accumulation, output rounded to bf16: about twice as fast where the CPU
# multiplies bf16 natively), or "auto": bf16 where native (AVX512_BF16 / AMX), else fp32.
_PREFILL = os.environ.get("GYRFALCON_QUANT_PREFILL", "auto")
# bf16 tiles only from this many rows (prompts, not a handful of decoding sequences): below it the product is
# mostly reading and dequantizing weights, so bf16's faster arithmetic buys little and fp32 stays exact.
_BF16_MIN_ROWS = 32


def set_backend(name: str) -> None:
    """"auto" (fast kernels where available) or "reference" (dequantize + matmul everywhere)."""
    global _BACKEND
    if name not in ("auto", "reference"):
        raise ValueError(f"backend must be 'auto' or 'reference', got {name!r}")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


@contextlib.contextmanager
def backend(name: str):
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


_KERNELS = None  # gyrfalcon.kernels.cpu, imported at first use


def _cpu_kernels():
    global _KERNELS
    if _BACKEND != "auto":
        return None
    if _KERNELS is None:
        from ..kernels import cpu

        _KERNELS = cpu
    return _KERNELS if _KERNELS.available() else None


class QuantWeight:
    """Base of the quantized matrices. Subclasses define `parts`, `dequantize`, `_cpu_linear`, `embedding`."""

    format: str = ""
    plain = True  # `linear` is the plain product x W^T (False: LLM.int8's mixed product)

    def __init__(self, shape: tuple[int, int], compute_dtype: torch.dtype):
        self.shape = torch.Size(shape)
        self.dtype = compute_dtype

    # ---- tensor-like surface used by model code
    @property
    def device(self) -> torch.device:
        return next(iter(self.parts().values())).device

    @property
    def is_meta(self) -> bool:
        return self.device.type == "meta"

    def dim(self) -> int:
        return 2

    def size(self, d: int | None = None):
        return self.shape if d is None else self.shape[d]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.format}, shape={tuple(self.shape)}, compute_dtype={self.dtype}, "
                f"device={self.device}, {self.nbytes / 2**20:.2f} MiB)")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return w.linear(x, bias)
        if func is F.embedding:
            ids, w = args[0], args[1]
            return w.embedding(ids)
        raise TypeError(f"{func.__name__} is not supported on a quantized weight ({cls.__name__}); only F.linear "
                        "and F.embedding are. Dequantize it first with .dequantize()")

    # ---- storage
    def parts(self) -> dict[str, torch.Tensor]:
        """suffix -> tensor: '' is the main matrix (saved as `<module>.weight`), others `<module>.weight<suffix>`."""
        raise NotImplementedError

    def set_parts(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            setattr(self, self._attr(k), v)
        self._moved()

    def _attr(self, suffix: str) -> str:
        return {"": "q"}.get(suffix, suffix.lstrip("_"))

    def _moved(self) -> None:
        """Called after the tensors change (load, device move): drop anything cached from them."""
        self._desc = None

    def _descriptor(self, kern):
        """The kernels' description of this matrix (pointers and sizes), built once."""
        if getattr(self, "_desc", None) is None:
            self._desc = self._describe(kern)
        return self._desc

    def apply_(self, fn) -> None:
        """Apply a module `_apply` function: device moves apply to every part, float casts change the compute dtype
        (the stored scales stay fp32 and the codes stay integers)."""
        parts = self.parts()
        probe = fn(torch.zeros((), dtype=torch.float32, device=self.device))
        if probe.is_floating_point() and probe.dtype != torch.float32:
            self.dtype = probe.dtype
        if probe.device != self.device:
            self.set_parts({k: v.to(probe.device) for k, v in parts.items()})

    # ---- math
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() >= 1:
            kern = _cpu_kernels()
            if kern is not None:
                return self._cpu_linear(kern, x, bias)
        elif x.device.type == "cuda" and _BACKEND == "auto":
            from . import cuda

            out = cuda.linear(self, x, bias)
            if out is not None:
                return out
        return self.reference_linear(x, bias)

    def reference_linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Dequantize + F.linear in the compute dtype (the definition the fast paths are tested against)."""
        dtype = x.dtype if x.is_floating_point() else self.dtype
        w = self.dequantize(dtype)
        return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    def _cpu_linear(self, kern, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, k = self.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != k):
            x2 = x2.contiguous()
        b32 = None if bias is None else bias.detach().float().contiguous()
        m = x2.shape[0]
        if m == 0:
            y = x2.new_zeros(0, n)
        elif m <= _DECODE_ROWS:
            y = kern.gemv(self._descriptor(kern), x2, b32)
        else:
            y = self._tiled(kern, x2, b32)
        return y.to(x.dtype).reshape(*lead, n)

    def _tiled(self, kern, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Prefill: y = x W^T with W dequantized (exactly, fp32) a tile of rows at a time into a reused buffer."""
        if x2.shape[0] >= _BF16_MIN_ROWS and _prefill_bf16(kern):
            return self._tiled_bf16(kern, x2, bias)
        n, k = self.shape
        rows = max(8, min(n, _TILE_BYTES // (4 * k)))
        buf = torch.empty(rows, k, dtype=torch.float32)
        yt = torch.empty(n, x2.shape[0], dtype=torch.float32)  # y^T: each tile's output rows are contiguous
        xt = x2.t()
        for a in range(0, n, rows):
            b = min(n, a + rows)
            tile = buf[: b - a]
            self._dequant_rows(kern, a, b, tile)
            torch.mm(tile, xt, out=yt[a:b])
        y = yt.t()
        if bias is not None:
            y = y + bias
        return y.contiguous()

    def _tiled_bf16(self, kern, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Prefill in bf16: x and each tile of W rounded to bf16, multiplied by oneDNN's bf16 GEMM (fp32
        accumulation, bf16 output), then the fp32 row scales (int8) and the bias applied in fp32."""
        n, k = self.shape
        rows = max(8, min(n, _TILE_BYTES_BF16 // (2 * k)))
        buf = torch.empty(rows, k, dtype=torch.bfloat16)
        xb = x2.to(torch.bfloat16)
        y = torch.empty(x2.shape[0], n, dtype=torch.float32)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            tile = buf[: b - a]
            self._dequant_rows_bf16(kern, a, b, tile)
            y[:, a:b] = F.linear(xb, tile)
        scale = self._row_scale()
        if scale is not None:
            y.mul_(scale)
        if bias is not None:
            y.add_(bias)
        return y

    def _row_scale(self) -> torch.Tensor | None:
        """A per-output scale the bf16 tiles leave out (int8: the row scales), or None."""
        return None

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _prefill_bf16(kern) -> bool:
    if _PREFILL == "bf16":
        return True
    if _PREFILL == "auto":
        global _NATIVE_BF16
        if _NATIVE_BF16 is None:
            _NATIVE_BF16 = kern.native_bf16()
        return _NATIVE_BF16
    return False


_NATIVE_BF16: bool | None = None


def set_prefill(mode: str) -> None:
    """The CPU prefill product (more than 8 rows): "auto", "bf16" or "fp32" (see `_PREFILL`)."""
    global _PREFILL
    if mode not in ("auto", "bf16", "fp32"):
        raise ValueError(f"prefill mode must be 'auto', 'bf16' or 'fp32', got {mode!r}")
    _PREFILL = mode


class Int8Weight(QuantWeight):
    """W[n, k] = q[n, k] * scale[n]; with `threshold`, `linear` is LLM.int8() (outlier features in fp32)."""

    format = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, compute_dtype: torch.dtype = torch.float32,
                 threshold: float | None = None):
        super().__init__(tuple(q.shape), compute_dtype)
        self.q = q
        self.scale = scale
        self.threshold = threshold
        self._desc = None

    @property
    def plain(self) -> bool:
        return self.threshold is None

    @classmethod
    def from_float(cls, w: torch.Tensor, compute_dtype: torch.dtype | None = None,
                   threshold: float | None = None, done: Callable[[int, int], None] | None = None) -> Int8Weight:
        """`done(a, b)` (optional) is told when rows a..b of `w` have been read for the last time."""
        q, scale = int8.quantize_int8_chunked(w.detach(), done=done)
        return cls(q, scale, compute_dtype or (w.dtype if w.is_floating_point() else torch.float32), threshold)

    @classmethod
    def empty(cls, shape: tuple[int, int], compute_dtype: torch.dtype, device="meta", threshold=None) -> Int8Weight:
        n, k = shape
        return cls(torch.empty(n, k, dtype=torch.int8, device=device),
                   torch.empty(n, dtype=torch.float32, device=device), compute_dtype, threshold)

    def parts(self) -> dict[str, torch.Tensor]:
        return {"": self.q, "_scale": self.scale}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return int8.dequantize_int8(self.q, self.scale, dtype or self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.threshold is not None:
            return int8.llm_int8_linear(x, self.q, self.scale, bias, self.threshold)
        return super().linear(x, bias)

    def _describe(self, kern):
        return kern.describe_int8(self.q, self.scale)

    def _dequant_rows(self, kern, a, b, out):
        kern.dequant_int8(self.q, self.scale, a, b, out)

    def _dequant_rows_bf16(self, kern, a, b, out):
        kern.dequant_int8_bf16(self.q, a, b, out)

    def _row_scale(self) -> torch.Tensor:
        return self.scale

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.q[ids].float() * self.scale[ids].unsqueeze(-1)
        return rows.to(self.dtype)


class Int4Weight(QuantWeight):
    """Blockwise NF4 / FP4 (see `int4`), rows padded to a multiple of 64 columns, double-quantized scales."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], quant_type: str,
                 compute_dtype: torch.dtype = torch.float32, absmax2: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None):
        super().__init__(shape, compute_dtype)
        self.format = quant_type
        self.quant_type = quant_type
        self.q = packed  # [N, KP / 2] uint8
        self.absmax = absmax  # [N, KP / 64] fp32, or uint8 (double quantization)
        self.absmax2 = absmax2
        self.offset = offset
        self.kp = int4.padded_width(shape[1])
        self._moved()

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    def _moved(self) -> None:
        super()._moved()
        self._offset_f = float(self.offset) if self.offset is not None and not self.offset.is_meta else 0.0

    @classmethod
    def from_float(cls, w: torch.Tensor, quant_type: str = "nf4", compute_dtype: torch.dtype | None = None,
                   double_quant: bool = True, rows: int | None = None,
                   done: Callable[[int, int], None] | None = None) -> Int4Weight:
        """Quantize [N, K]; rows are padded to KP and quantized a chunk at a time (bounded temporaries); the
        result equals `int4.quantize_4bit(pad_rows(w))`. `done(a, b)`: as for `Int8Weight.from_float`."""
        w = w.detach()
        n, k = w.shape
        kp = int4.padded_width(k)
        rows = rows or max(1, (16 << 20) // (4 * kp))
        packed = torch.empty(n, kp // 2, dtype=torch.uint8, device=w.device)
        absmax = torch.empty(n, kp // int4.BLOCKSIZE, dtype=torch.float32, device=w.device)
        for a in range(0, n, rows):
            q = int4.quantize_4bit(int4.pad_rows(w[a : a + rows]), quant_type, double_quant=False)
            packed[a : a + rows] = q.packed.view(-1, kp // 2)
            absmax[a : a + rows] = q.absmax.view(-1, kp // int4.BLOCKSIZE)
            if done is not None:
                done(a, min(n, a + rows))
        absmax2 = offset = None
        if double_quant:
            dq = int4.double_quantize(int4.Quant4bit(packed.view(-1), absmax.view(-1), (n, kp), quant_type))
            absmax, absmax2, offset = dq.absmax.view(n, -1), dq.absmax2, dq.offset.reshape(1)
        cdt = compute_dtype or (w.dtype if w.is_floating_point() else torch.float32)
        return cls(packed, absmax, (n, k), quant_type, cdt, absmax2, offset)

    @classmethod
    def empty(cls, shape: tuple[int, int], quant_type: str, compute_dtype: torch.dtype, device="meta",
              double_quant: bool = True) -> Int4Weight:
        n, k = shape
        kp = int4.padded_width(k)
        nblocks = n * kp // int4.BLOCKSIZE
        if double_quant:
            return cls(torch.empty(n, kp // 2, dtype=torch.uint8, device=device),
                       torch.empty(n, kp // int4.BLOCKSIZE, dtype=torch.uint8, device=device), shape, quant_type,
                       compute_dtype, torch.empty(-(-nblocks // int4.NESTED_BLOCKSIZE), dtype=torch.float32,
                                                  device=device), torch.empty(1, dtype=torch.float32, device=device))
        return cls(torch.empty(n, kp // 2, dtype=torch.uint8, device=device),
                   torch.empty(n, kp // int4.BLOCKSIZE, dtype=torch.float32, device=device), shape, quant_type,
                   compute_dtype)

    def parts(self) -> dict[str, torch.Tensor]:
        p = {"": self.q, "_absmax": self.absmax}
        if self.double_quant:
            p["_absmax2"] = self.absmax2
            p["_offset"] = self.offset
        return p

    def quant4bit(self) -> int4.Quant4bit:
        """The padded [N, KP] matrix in `int4`'s (bitsandbytes') flat form."""
        return int4.Quant4bit(self.q.reshape(-1), self.absmax.reshape(-1), (self.shape[0], self.kp),
                              self.quant_type, int4.BLOCKSIZE, self.absmax2,
                              None if self.offset is None else self.offset.reshape(()))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = int4.dequantize_4bit(self.quant4bit(), torch.float32)
        return w[:, : self.shape[1]].to(dtype or self.dtype)

    def _kernel_args(self) -> dict:
        dev = self.q.device
        return dict(code=int4.code_book(self.quant_type, dev), absmax2=self.absmax2,
                    code2=int4.code_book("dynamic", dev) if self.double_quant else None, offset=self._offset_f)

    def _describe(self, kern):
        n, k = self.shape
        a = self._kernel_args()
        return kern.describe_4bit(self.q, self.absmax, a["code"], n, k, self.kp, a["absmax2"], a["code2"],
                                  a["offset"])

    def _dequant_rows(self, kern, a, b, out):
        args = self._kernel_args()
        kern.dequant_4bit(self.q, self.absmax, args["code"], self.shape[1], self.kp, a, b, out, args["absmax2"],
                          args["code2"], args["offset"])

    def _dequant_rows_bf16(self, kern, a, b, out):
        args = self._kernel_args()
        kern.dequant_4bit_bf16(self.q, self.absmax, args["code"], self.shape[1], self.kp, a, b, out,
                               args["absmax2"], args["code2"], args["offset"])

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        sub = Int4Weight(self.q[flat], self._absmax_rows(flat), (flat.numel(), self.shape[1]), self.quant_type,
                         self.dtype)
        return sub.dequantize().reshape(*ids.shape, self.shape[1])

    def _absmax_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax[rows]
        full = self.quant4bit().absmax_fp32().view(self.shape[0], -1)
        return full[rows]


# ---------------------------------------------------------------------------------------------------------------
# Modules


class _QuantModule(nn.Module):
    """Stores `self.weight` (a QuantWeight) under `<prefix>weight*` in state dicts; `tied` modules store nothing
    of it (the module that owns the shared weight does)."""

    weight: QuantWeight

    def __init__(self, weight: QuantWeight, tied: bool = False):
        super().__init__()
        self.weight = weight
        self.tied = tied

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.tied:
            for suffix, t in self.weight.parts().items():
                destination[prefix + "weight" + suffix] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = {} if self.tied else {prefix + "weight" + s: s for s in self.weight.parts()}
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        new = {}
        current = self.weight.parts()
        for key, suffix in ours.items():
            if key not in state_dict:
                missing_keys.append(key)
                continue
            v = state_dict[key]
            want = current[suffix]
            if tuple(v.shape) != tuple(want.shape) or v.dtype != want.dtype:
                error_msgs.append(f"{key}: checkpoint {v.dtype} {list(v.shape)} vs model {want.dtype} "
                                  f"{list(want.shape)}")
                continue
            assign = local_metadata.get("assign_to_params_buffers", False) or want.is_meta
            new[suffix] = v if assign else want.copy_(v)
        if new:
            self.weight.set_parts(new)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.weight.apply_(fn)
        return self


class QuantLinear(_QuantModule):
    """y = x W^T + b with a quantized W. `Int8Linear` / `Int4Linear` are this with an Int8Weight / Int4Weight."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None, tied: bool = False):
        super().__init__(weight, tied)
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _InputGradLinear.apply(x, self)
        w = self.weight
        # Decoding: a few fp32 rows on CPU go straight to the matrix-vector kernel. This is what `w.linear` does
        # for them too, minus its checks and conversions: a decode step makes ~4 such calls per layer, and the
        # Python around each one costs as much as a small layer's kernel.
        if x.dtype is torch.float32 and x.device.type == "cpu" and w.plain and x.is_contiguous():
            k = x.shape[-1]
            m = x.numel() // k if k else 0
            if 0 < m <= _DECODE_ROWS:
                kern = _cpu_kernels()
                if kern is not None:
                    desc, bias = self._kernel_operands(kern)
                    return kern.gemv(desc, x.view(m, k), bias).view(*x.shape[:-1], w.shape[0])
        return w.linear(x, self.bias)

    def _kernel_operands(self, kern) -> tuple:
        """(the weight's kernel descriptor, the bias as contiguous fp32 or None) for the CPU matrix-vector kernels."""
        bias = self.bias
        if bias is not None and (bias.dtype is not torch.float32 or not bias.is_contiguous()):
            bias = bias.detach().float().contiguous()
        return self.weight._descriptor(kern), bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.weight.format}" + (", tied" if self.tied else ""))


class _InputGradLinear(torch.autograd.Function):
    """A frozen quantized Linear inside a graph that trains something else (QLoRA's adapters, before it or around
    it): forward is the module's usual product (the fast kernels have no autograd of their own); backward gives the
    input's gradient dy @ W with W dequantized only then, and nothing for the frozen W or bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
        ctx.module = module
        return module.weight.linear(x, module.bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = ctx.module.weight.dequantize(grad_out.dtype)
        return grad_out @ w, None


class Int8Linear(QuantLinear):
    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype=None, threshold=None) -> Int8Linear:
        return cls(Int8Weight.from_float(linear.weight, compute_dtype, threshold), _bias(linear))


class Int4Linear(QuantLinear):
    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type="nf4", compute_dtype=None, double_quant=True) -> Int4Linear:
        return cls(Int4Weight.from_float(linear.weight, quant_type, compute_dtype, double_quant), _bias(linear))


class QuantEmbedding(_QuantModule):
    """A gather-only embedding over quantized rows (usually int8, shared with a tied output head)."""

    def __init__(self, weight: QuantWeight, padding_idx: int | None = None):
        super().__init__(weight)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.embedding(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.weight.format}"


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def _kernel_pair(mod1: nn.Module, mod2: nn.Module, rows: int) -> tuple | None:
    """(kernels, operands of mod1, operands of mod2) when both are plain QuantLinears whose decode products of `rows`
    input rows `forward` would send to the CPU kernels, else None."""
    kern = _cpu_kernels()
    if kern is None or not 0 < rows <= _DECODE_ROWS:
        return None
    for mod in (mod1, mod2):
        if (not isinstance(mod, QuantLinear) or mod._forward_hooks or mod._forward_pre_hooks or not mod.weight.plain
                or mod.weight.device.type != "cpu"):
            return None
    return kern, mod1._kernel_operands(kern), mod2._kernel_operands(kern)


def decode_pair(mod1: nn.Module, mod2: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mod1(x), mod2(x)) for two quantized linears of one decode-sized input ([..., K] contiguous fp32 on CPU, at most
    8 rows, no autograd: the caller checks) in one kernel call, the input quantized once; the same numbers as the two
    module calls. None when either module is not a plain QuantLinear on the CPU kernels."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    found = _kernel_pair(mod1, mod2, rows)
    if found is None or mod1.in_features != k or mod2.in_features != k:
        return None
    kern, (d1, b1), (d2, b2) = found
    y1, y2 = kern.gemv_pair(d1, b1, d2, b2, x.view(rows, k))
    return y1.view(*x.shape[:-1], -1), y2.view(*x.shape[:-1], -1)


def decode_sum(mod1: nn.Module, x1: torch.Tensor, mod2: nn.Module, x2: torch.Tensor,
               residual: torch.Tensor) -> torch.Tensor | None:
    """mod1(x1) + mod2(x2) + residual, added in that order, in one kernel call (the same numbers as the module calls
    and adds) for two quantized linears with decode-sized inputs (as in `decode_pair`), else None."""
    k1, k2 = x1.shape[-1], x2.shape[-1]
    rows = x1.numel() // k1 if k1 else 0
    found = _kernel_pair(mod1, mod2, rows)
    if (found is None or x2.numel() != rows * k2 or mod1.in_features != k1 or mod2.in_features != k2
            or mod1.out_features != mod2.out_features or residual.shape != (*x1.shape[:-1], mod1.out_features)):
        return None
    kern, (d1, b1), (d2, b2) = found
    y = kern.gemv_sum(d1, b1, x1.view(rows, k1), d2, b2, x2.view(rows, k2), residual.view(rows, -1))
    return y.view(residual.shape)
