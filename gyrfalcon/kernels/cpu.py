"""gyrfalcon's CPU kernels (`quant_cpu.c`: quantized linears; `gemv_f32.c`: fp32 matrix-vector products;
`sampling_cpu.c`: the top-p mask without a full sort; `decode_cpu.c`: a decode step's attention and GELU),
compiled once per machine at first use into one library,
cached, called through ctypes.

    from gyrfalcon.kernels import cpu
    if cpu.available():
        y = cpu.gemv_int8(x, qweight, scale, bias)          # x [B <= 8, K] fp32
        y = cpu.gemv_f32(x, weight, bias)                    # nn.Linear's fp32 weight, used in place

The shared library is built with the machine's C compiler (`$CC`, else `cc`, `gcc` or `clang`) as
`-O3 -march=native -fopenmp -shared -fPIC` into `$GYRFALCON_CACHE_DIR/kernels` (default
`~/.cache/gyrfalcon/kernels`, or under `$XDG_CACHE_HOME`), named by a hash of the source, the flags, the compiler's
version and the CPU's feature flags, so a changed source or another machine never picks up a stale build. The
file is compiled under a temporary name and renamed into place, so a killed build never leaves a broken library.
Building takes about a second. Without a working compiler the quantized layers fall back to the reference path
(dequantize + matmul: correct, slower) with one warning. `GYRFALCON_KERNELS=0` disables the kernels.

Nothing here links against torch: the library takes raw pointers, so it needs no torch headers and no rebuild
when torch changes. The OpenMP runtime it links (libgomp.so.1) resolves to the one torch has already loaded, so
both share one thread pool; the thread count passed in is torch's.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("quant_cpu.c", "gemv_f32.c", "sampling_cpu.c", "decode_cpu.c"))
# Tried in order: the first set that compiles wins (a compiler without OpenMP, or one that does not know
# -march=native, still gets a working, if single-threaded or generic, library).
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off"),
    ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off"),
    ("-O3", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off"),
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_f32 = ctypes.c_float
_int = ctypes.c_int
_SIGNATURES = {
    "gf_gemv_i8": [_p, _p, _p, _i64, _i64, _p, _i64, _i64, _p, _i64, _int],
    "gf_dequant_i8": [_p, _p, _i64, _i64, _i64, _p, _int],
    "gf_gemv_q4": [_p, _p, _p, _p, _p, _f32, _p, _p, _i64, _i64, _i64, _p, _i64, _i64, _p, _i64, _int],
    "gf_dequant_q4": [_p, _p, _p, _p, _p, _f32, _p, _i64, _i64, _i64, _i64, _p, _int],
    "gf_dequant_bf16_i8": [_p, _i64, _i64, _i64, _p, _int],
    "gf_dequant_bf16_q4": [_p, _p, _p, _p, _p, _f32, _p, _i64, _i64, _i64, _i64, _p, _int],
    "gf_gemv": [_p, _p, _p, _i64, _i64, _p, _i64, _int],
    "gf_gemv_pair": [_p, _p, _p, _p, _p, _i64, _i64, _p, _p, _int],
    "gf_gemv_sum": [_p, _p, _p, _p, _p, _p, _p, _i64, _p, _int],
    "gf_gemv_f32": [_p, _p, _i64, _i64, _p, _i64, _i64, _p, _i64, _int],
    "gf_gemv_f32_pair": [_p, _p, _i64, _p, _p, _i64, _i64, _p, _i64, _i64, _p, _p, _int],
    "gf_gemv_f32_sum": [_p, _p, _i64, _p, _p, _p, _i64, _p, _p, _i64, _i64, _p, _int],
    "gf_top_p_drop": [_p, _p, _i64, _i64, _p, _p, _int],
    "gf_gemv_f32_max_rows": [],
    "gf_attn_decode": [_p, _i64, _i64, _i64, _i64, _i64, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _p, _p, _p, _i64,
                       _f32, _int],
    "gf_gelu": [_p, _i64],
    "gf_simd": [],
    "gf_version": [],
}
_INT_RESULT = ("gf_simd", "gf_version", "gf_top_p_drop", "gf_gemv_f32_max_rows", "gf_attn_decode", "gf_gemv_pair",
               "gf_gemv_sum")
MAX_BATCH = 8  # rows per quantized gemv call (the kernels' register blocking)
# Rows per gemv_f32 call: 16 where the library has AVX2 or AVX-512 (gemv_f32.c's tiles), else 8. Set at load.
F32_MAX_ROWS = 8


def cache_dir() -> Path:
    root = os.environ.get("GYRFALCON_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg if xdg else Path.home() / ".cache") / "gyrfalcon" / "kernels"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _isa_flags() -> tuple[str, ...]:
    """`GYRFALCON_KERNELS_ISA=avx2` builds without AVX-512 (to test or compare the AVX2 paths on an AVX-512 CPU)."""
    isa = os.environ.get("GYRFALCON_KERNELS_ISA", "native").lower()
    if isa == "avx2":
        return ("-mno-avx512f",)
    if isa != "native":
        raise RuntimeError(f"GYRFALCON_KERNELS_ISA must be 'native' or 'avx2', got {isa!r}")
    return ()


def build(force: bool = False) -> Path:
    """Compile the library if no cached build exists for this source, compiler and CPU; return its path.
    Raises RuntimeError with the compiler's output when no flag set compiles."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc or clang)")
    src = b"\0".join(path.read_bytes() for path in SOURCES)
    version = _compiler_version(cc)
    errors = []
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    for flags in FLAG_SETS:
        flags = (*flags, *_isa_flags())
        key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), cc.encode(), version.encode(),
                                         _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
        target = out_dir / f"gyrfalcon_cpu-{key}.so"
        if target.is_file() and not force:
            return target
        tmp = out_dir / f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        cmd = [cc, *flags, *map(str, SOURCES), "-o", str(tmp), "-lm"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(cmd)}: {exc}")
            continue
        if proc.returncode == 0 and tmp.is_file():
            os.replace(tmp, target)  # atomic: a concurrent build of the same key writes identical bytes
            return target
        tmp.unlink(missing_ok=True)
        errors.append(f"{' '.join(cmd)}:\n{proc.stderr.strip()[-2000:]}")
    raise RuntimeError("cannot compile the quantized CPU kernels:\n" + "\n".join(errors))


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _error, F32_MAX_ROWS
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("GYRFALCON_KERNELS", "1").lower() in ("0", "false", "no", "off", "reference"):
                raise RuntimeError("disabled by GYRFALCON_KERNELS")
            lib = ctypes.CDLL(str(build()))
            for name, args in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes = args
                fn.restype = _int if name in _INT_RESULT else None
            F32_MAX_ROWS = int(lib.gf_gemv_f32_max_rows())
            _lib = lib
        except (RuntimeError, OSError, AttributeError) as exc:
            _error = str(exc)
            if "disabled" not in _error:
                warnings.warn(f"gyrfalcon: quantized CPU kernels unavailable, using the slower reference path "
                              f"(dequantize + matmul): {exc}", RuntimeWarning, stacklevel=3)
        _tried = True
        return _lib


def available() -> bool:
    """True when the compiled kernels can be used (built and loaded, not disabled)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _error


def simd() -> bool:
    """True when the library was built with vector code paths (AVX2 or AVX-512; else portable scalar C)."""
    lib = _load()
    return bool(lib and lib.gf_simd())


def isa() -> str:
    """The matrix-vector kernels' instruction set: "avx512-vnni", "avx2", "scalar", or "none" (not loaded)."""
    lib = _load()
    return "none" if lib is None else {2: "avx512-vnni", 1: "avx2"}.get(int(lib.gf_simd()), "scalar")


class WeightDesc(ctypes.Structure):
    """A quantized matrix as the kernels see it (`gf_weight` in quant_cpu.c). Built once per weight and kept (with
    references to its tensors, so the pointers stay valid): a call then passes 8 arguments, not 17."""

    _fields_ = [("kind", _i64), ("N", _i64), ("K", _i64), ("KP", _i64), ("w", _p), ("scale", _p), ("absq", _p),
                ("absmax2", _p), ("code2", _p), ("code", _p), ("offset", ctypes.c_double)]


def describe_int8(w: torch.Tensor, scale: torch.Tensor) -> WeightDesc:
    d = WeightDesc(0, w.shape[0], w.shape[1], -(-w.shape[1] // 64) * 64, w.data_ptr(), scale.data_ptr(), None, None,
                   None, None, 0.0)
    d._keep = (w, scale)
    return d


def describe_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int, kp: int,
                  absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                  offset: float = 0.0) -> WeightDesc:
    dq = absmax.dtype == torch.uint8
    d = WeightDesc(1, n, k, kp, packed.data_ptr(), None if dq else absmax.data_ptr(),
                   absmax.data_ptr() if dq else None, _ptr(absmax2), _ptr(code2), code.data_ptr(), float(offset))
    d._keep = (packed, absmax, code, absmax2, code2)
    return d


def gemv(desc: WeightDesc, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [B <= 8, K] fp32 with unit column stride -> [B, N] fp32, for a weight described by `describe_*`."""
    b = x.shape[0]
    y = torch.empty(b, desc.N, dtype=torch.float32)
    _lib.gf_gemv(ctypes.byref(desc), None if bias is None else bias.data_ptr(), x.data_ptr(), x.stride(0), b,
                 y.data_ptr(), desc.N, torch.get_num_threads())
    return y


def gemv_pair(d1: WeightDesc, b1: torch.Tensor | None, d2: WeightDesc, b2: torch.Tensor | None,
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`gemv(d1, x, b1)`, `gemv(d2, x, b2)`) in one call, the input quantized once: x [B <= 8, K] contiguous fp32."""
    b = x.shape[0]
    y1, y2 = torch.empty(b, d1.N), torch.empty(b, d2.N)
    if _lib.gf_gemv_pair(ctypes.byref(d1), _ptr(b1), ctypes.byref(d2), _ptr(b2), x.data_ptr(), x.stride(0), b,
                         y1.data_ptr(), y2.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError("gemv_pair: cannot allocate its input buffers")
    return y1, y2


def gemv_sum(d1: WeightDesc, b1: torch.Tensor | None, x1: torch.Tensor, d2: WeightDesc, b2: torch.Tensor | None,
             x2: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
    """`gemv(d1, x1, b1) + gemv(d2, x2, b2) + r`, added in that order, in one call: x1 [B <= 8, K1], x2 [B, K2],
    r [B, N] or None, all contiguous fp32."""
    b = x1.shape[0]
    y = torch.empty(b, d1.N)
    if _lib.gf_gemv_sum(ctypes.byref(d1), _ptr(b1), x1.data_ptr(), ctypes.byref(d2), _ptr(b2), x2.data_ptr(), _ptr(r),
                        b, y.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError("gemv_sum: cannot allocate its buffers")
    return y


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_x(x: torch.Tensor, k: int) -> None:
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] != k or x.device.type != "cpu":
        raise ValueError(f"kernel input must be a CPU fp32 [B, {k}] tensor with unit column stride")


def gemv_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, K] fp32 (B <= F32_MAX_ROWS, unit column stride), w [N, K] contiguous fp32, bias [N] fp32 or None ->
    [B, N] fp32 (= F.linear(x, w, bias) up to fp32 rounding). The caller checks `available()` first."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"gyrfalcon CPU kernels unavailable: {_error}")
    n, k = w.shape
    _check_x(x, k)
    b = x.shape[0]
    if b > F32_MAX_ROWS or not w.is_contiguous() or w.dtype != torch.float32:
        raise ValueError(f"gemv_f32 takes at most {F32_MAX_ROWS} rows and a contiguous fp32 weight")
    y = out if out is not None else torch.empty(b, n, dtype=torch.float32)
    lib.gf_gemv_f32(w.data_ptr(), _ptr(bias), n, k, x.data_ptr(), x.stride(0), b, y.data_ptr(), y.stride(0),
                     torch.get_num_threads())
    return y


def gemv_f32_unchecked(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, rows: int,
                       out: torch.Tensor) -> None:
    """`gemv_f32` for callers that have checked everything already (the decode path of models/fast_linear.py):
    x contiguous fp32 with `rows` rows of w.shape[1], w contiguous fp32 [N, K], out contiguous fp32 [rows, N],
    the library loaded."""
    n, k = w.shape
    _lib.gf_gemv_f32(w.data_ptr(), None if bias is None else bias.data_ptr(), n, k, x.data_ptr(), k, rows,
                     out.data_ptr(), n, torch.get_num_threads())


def gemv_f32_pair_unchecked(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                            b2: torch.Tensor | None, rows: int, out1: torch.Tensor, out2: torch.Tensor) -> None:
    """out1 = x w1^T + b1 and out2 = x w2^T + b2 in one call (gemv_f32.c's gf_gemv_f32_pair), each exactly as
    `gemv_f32` computes it. Unchecked like `gemv_f32_unchecked`: x contiguous fp32 [rows, K], w1 [N1, K] and w2
    [N2, K] contiguous fp32, out1 [rows, N1] and out2 [rows, N2] contiguous fp32, the library loaded."""
    k = x.shape[-1]
    _lib.gf_gemv_f32_pair(w1.data_ptr(), None if b1 is None else b1.data_ptr(), w1.shape[0], w2.data_ptr(),
                          None if b2 is None else b2.data_ptr(), w2.shape[0], k, x.data_ptr(), k, rows,
                          out1.data_ptr(), out2.data_ptr(), torch.get_num_threads())


def gemv_f32_sum_unchecked(x1: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, x2: torch.Tensor,
                           w2: torch.Tensor, b2: torch.Tensor | None, r: torch.Tensor | None, rows: int,
                           out: torch.Tensor) -> None:
    """out = (x1 w1^T + b1) + (x2 w2^T + b2) + r, added in that order (gf_gemv_f32_sum), each product exactly as
    `gemv_f32` computes it. Unchecked: x1 [rows, K1], x2 [rows, K2], w1 [N, K1], w2 [N, K2], r and out [rows, N],
    all contiguous fp32, the library loaded."""
    _lib.gf_gemv_f32_sum(w1.data_ptr(), None if b1 is None else b1.data_ptr(), w1.shape[1], x1.data_ptr(),
                         w2.data_ptr(), None if b2 is None else b2.data_ptr(), w2.shape[1], x2.data_ptr(),
                         None if r is None else r.data_ptr(), w1.shape[0], rows, out.data_ptr(),
                         torch.get_num_threads())


def gemv_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, K] fp32 (B <= 8), w [N, K] int8, scale [N] fp32, bias [N] fp32 or None -> [B, N] fp32."""
    lib = _load()
    n, k = w.shape
    _check_x(x, k)
    b = x.shape[0]
    if b > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} rows per call, got {b}")
    y = out if out is not None else torch.empty(b, n, dtype=torch.float32)
    lib.gf_gemv_i8(w.data_ptr(), scale.data_ptr(), _ptr(bias), n, k, x.data_ptr(), x.stride(0), b, y.data_ptr(),
                   y.stride(0), torch.get_num_threads())
    return y


def dequant_int8(w: torch.Tensor, scale: torch.Tensor, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
    """out [n1 - n0, K] fp32 (contiguous) = rows n0..n1 of the int8 weight, exactly as the reference computes."""
    lib = _load()
    lib.gf_dequant_i8(w.data_ptr(), scale.data_ptr(), n0, n1, w.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
              kp: int, bias: torch.Tensor | None = None, absmax2: torch.Tensor | None = None,
              code2: torch.Tensor | None = None, offset: float = 0.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, K] fp32 (B <= 8); packed [N * KP / 2] uint8; absmax fp32 per block, or uint8 codes with absmax2,
    code2 and offset (double quantization); code [16] fp32 -> [B, N] fp32."""
    lib = _load()
    _check_x(x, k)
    b = x.shape[0]
    if b > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} rows per call, got {b}")
    y = out if out is not None else torch.empty(b, n, dtype=torch.float32)
    dq = absmax.dtype == torch.uint8
    lib.gf_gemv_q4(packed.data_ptr(), None if dq else absmax.data_ptr(), absmax.data_ptr() if dq else None,
                   _ptr(absmax2), _ptr(code2), float(offset), code.data_ptr(), _ptr(bias), n, k, kp, x.data_ptr(),
                   x.stride(0), b, y.data_ptr(), y.stride(0), torch.get_num_threads())
    return y


def dequant_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, k: int, kp: int, n0: int, n1: int,
                 out: torch.Tensor, absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                 offset: float = 0.0) -> torch.Tensor:
    """out [n1 - n0, K] fp32 (contiguous) = rows n0..n1 of the 4-bit weight, exactly as the reference computes."""
    lib = _load()
    dq = absmax.dtype == torch.uint8
    lib.gf_dequant_q4(packed.data_ptr(), None if dq else absmax.data_ptr(), absmax.data_ptr() if dq else None,
                      _ptr(absmax2), _ptr(code2), float(offset), code.data_ptr(), n0, n1, k, kp, out.data_ptr(),
                      torch.get_num_threads())
    return out


def dequant_int8_bf16(w: torch.Tensor, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
    """out [n1 - n0, K] bf16 (contiguous) = the int8 codes of rows n0..n1, exactly (the row scales are not applied:
    the caller multiplies the product by them in fp32)."""
    lib = _load()
    lib.gf_dequant_bf16_i8(w.data_ptr(), n0, n1, w.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def dequant_4bit_bf16(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, k: int, kp: int, n0: int,
                      n1: int, out: torch.Tensor, absmax2: torch.Tensor | None = None,
                      code2: torch.Tensor | None = None, offset: float = 0.0) -> torch.Tensor:
    """out [n1 - n0, K] bf16 (contiguous) = rows n0..n1 of the 4-bit weight: the reference's fp32 values rounded to
    the nearest bf16."""
    lib = _load()
    dq = absmax.dtype == torch.uint8
    lib.gf_dequant_bf16_q4(packed.data_ptr(), None if dq else absmax.data_ptr(), absmax.data_ptr() if dq else None,
                           _ptr(absmax2), _ptr(code2), float(offset), code.data_ptr(), n0, n1, k, kp,
                           out.data_ptr(), torch.get_num_threads())
    return out


def native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512_BF16 or AMX) and torch's oneDNN uses it: a bf16
    matrix product then runs at about twice the fp32 rate."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and ("avx512_bf16" in _cpu_flags() or "amx_bf16" in _cpu_flags()))
    except (AttributeError, RuntimeError):
        return False


def top_p_drop(logits: torch.Tensor, probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """[B, V] bool: what nucleus filtering drops from each row (sampling.filter_top_k_top_p's mask, bit for bit;
    see sampling_cpu.c). logits and probs: contiguous CPU fp32 [B, V]; top_p: one value per row."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"gyrfalcon CPU kernels unavailable: {_error}")
    if (logits.dtype != torch.float32 or probs.dtype != torch.float32 or logits.dim() != 2
            or logits.shape != probs.shape or not logits.is_contiguous() or not probs.is_contiguous()
            or logits.device.type != "cpu" or probs.device.type != "cpu" or len(top_p) != logits.shape[0]):
        raise ValueError("top_p_drop takes contiguous CPU fp32 logits and probs of one shape [B, V], one top_p a row")
    rows, vocab = logits.shape
    limits = torch.tensor(top_p, dtype=torch.float32)
    drop = torch.empty(rows, vocab, dtype=torch.bool)
    if lib.gf_top_p_drop(logits.data_ptr(), probs.data_ptr(), rows, vocab, limits.data_ptr(), drop.data_ptr(),
                         torch.get_num_threads()) != 0:
        raise MemoryError("top_p_drop: cannot allocate its sort buffers")
    return drop


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of a contiguous CPU fp32 tensor, in place (= torch's gelu to a few ulps; decode_cpu.c)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"gyrfalcon CPU kernels unavailable: {_error}")
    if x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError("gelu_ takes a contiguous CPU fp32 tensor")
    lib.gf_gelu(x.data_ptr(), x.numel())
    return x


def attn_decode(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
                sin_signed: torch.Tensor, lengths: torch.Tensor, tables: torch.Tensor, block_size: int,
                slot_stride: int, head_stride: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotary + cache write + attention for one new token a row (decode_cpu.c's gf_attn_decode).

    qkv [B, (H + 2G) d] fp32 contiguous, per KV group (H/G) queries, then the key and the value; cos and the
    sign-folded sin [positions, d] (`Rotary.rolled_table`); lengths [B] int64: each row's cached tokens (the new
    token's position); tables [B, W] int64, block_size, slot_stride, head_stride: where position s of row b, KV head g
    lies in k and v (see `kv_addr` in decode_cpu.c); k, v: the cache's fp32 storage for this layer, written in place.
    Returns [B, H * d]. The caller has checked shapes, dtypes and that every position the rows touch is inside the
    tables and the storage (this is the hot path of every decode step)."""
    b = qkv.shape[0]
    out = torch.empty(b, num_heads * head_dim)
    if _lib.gf_attn_decode(qkv.data_ptr(), qkv.stride(0), b, num_heads, num_kv_heads, head_dim, cos.data_ptr(),
                           sin_signed.data_ptr(), lengths.data_ptr(), tables.data_ptr(), tables.stride(0), block_size,
                           slot_stride, head_stride, k.data_ptr(), v.data_ptr(), out.data_ptr(), out.stride(0),
                           head_dim**-0.5, torch.get_num_threads()) != 0:
        raise MemoryError("attn_decode: cannot allocate its scratch buffer")
    return out
