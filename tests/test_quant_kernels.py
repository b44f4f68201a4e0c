"""The CPU kernels against the reference path (dequantize + fp32 matmul), over shapes, batch sizes and formats.

Tolerances (written from the kernel's arithmetic, see gyrfalcon/kernels/quant_cpu.c):
* matrix-vector (<= 8 rows): activations are rounded to int16 per block of 64 (error <= block max / 65534 each),
  4-bit code values to multiples of 1/8191 (error <= absmax / 16382 each); products are exact in int32 and
  blocks are summed in fp32. So |y - y_ref| <= sum_k |W[n,k]| xmax_blk(k) / 65534 + sum_k absmax[n,k] |x_k| / 16382
  + fp32 rounding; the test allows 4x that bound plus 1e-5 relative to sum_k |W x|.
* dequantization (the prefill tiles) is exact: bitwise equal to the reference dequantization; the bf16 tiles are
  bitwise the reference's fp32 values rounded to nearest-even bf16 (int8: the codes, exact in bf16).
* prefill (> 8 rows), fp32 tiles: fp32 matmul of the exact weights: close to F.linear at fp32 matmul precision.
* prefill, bf16 tiles (the default where the CPU has native bf16, from 32 rows): x and W each rounded to bf16
  (relative error <= 2^-9 each), fp32 accumulation, the output rounded to bf16 (<= 2^-9 of the accumulated sum), so
  |y - y_ref| <= (3 * 2^-9 + O(2^-16)) * sum_k |W[n,k] x[k]|; the test allows 2^-7 of that sum.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gyrfalcon.kernels import cpu
from gyrfalcon.quant import int4
from gyrfalcon.quant.linear import Int4Weight, Int8Weight, backend

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")

SHAPES = [(1, 64), (37, 64), (50, 100), (129, 256), (16, 4544), (300, 33), (64, 1000)]
BATCHES = [1, 2, 3, 5, 8]
FORMATS = ["int8", "nf4", "fp4", "nf4-no-dq"]


def _weight(fmt: str, w: torch.Tensor):
    if fmt == "int8":
        return Int8Weight.from_float(w)
    if fmt == "nf4-no-dq":
        return Int4Weight.from_float(w, "nf4", double_quant=False)
    return Int4Weight.from_float(w, fmt)


def _bound(qw, x: torch.Tensor) -> torch.Tensor:
    """The error bound of the docstring, per output element, [B, N]."""
    w = qw.dequantize(torch.float32).abs()
    n, k = qw.shape
    kp = int4.padded_width(k)
    xp = F.pad(x.abs(), (0, kp - k))
    xmax = xp.view(x.shape[0], -1, 64).amax(dim=2).repeat_interleave(64, dim=1)[:, :k]  # block max per element
    bound = xmax @ w.t() / 65534
    if isinstance(qw, Int4Weight):
        absmax = qw.quant4bit().absmax_fp32().view(n, -1).repeat_interleave(64, dim=1)[:, :k]
        bound = bound + x.abs() @ absmax.t() / 16382
    return 4 * bound + 1e-5 * (x.abs() @ w.t()) + 1e-30


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_matches_reference(fmt, shape):
    n, k = shape
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, 0] = 1.0  # an outlier weight: one block with a large absmax
    qw = _weight(fmt, w)
    bias = torch.randn(n, generator=g)
    for b in BATCHES:
        x = torch.randn(b, k, generator=g)
        x[:, k // 2] *= 30  # an outlier feature
        ref = F.linear(x, qw.dequantize(torch.float32), bias)
        y = qw.linear(x, bias)
        err = (y - ref).abs()
        bound = _bound(qw, x)
        assert y.shape == (b, n) and y.dtype == torch.float32
        assert bool((err <= bound).all()), f"{fmt} {shape} b={b}: max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(37, 64), (50, 100), (300, 33)])
def test_dequantized_tiles_are_exact(fmt, shape):
    n, k = shape
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.1
    qw = _weight(fmt, w)
    ref = qw.dequantize(torch.float32)
    for a, b in [(0, n), (5, 17), (n - 1, n)]:
        out = torch.empty(b - a, k)
        qw._dequant_rows(cpu, a, b, out)
        assert torch.equal(out, ref[a:b])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(37, 64), (50, 100), (300, 33)])
def test_bf16_tiles_are_the_rounded_reference(fmt, shape):
    n, k = shape
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4)) * 0.1
    qw = _weight(fmt, w)
    ref = qw.q.to(torch.bfloat16) if fmt == "int8" else qw.dequantize(torch.float32).to(torch.bfloat16)
    for a, b in [(0, n), (5, 17), (n - 1, n)]:
        out = torch.empty(b - a, k, dtype=torch.bfloat16)
        qw._dequant_rows_bf16(cpu, a, b, out)
        assert torch.equal(out, ref[a:b])


@pytest.fixture(params=["fp32", "bf16"])
def prefill_mode(request):
    import gyrfalcon.quant.linear as lin

    old = lin._PREFILL
    lin.set_prefill(request.param)
    yield request.param
    lin._PREFILL = old


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(203, 100), (64, 1000), (300, 33)])
def test_prefill_tiles_match_reference(fmt, shape, prefill_mode, monkeypatch):
    import gyrfalcon.quant.linear as lin

    monkeypatch.setattr(lin, "_TILE_BYTES", 4096)  # many tiles, a short last one
    monkeypatch.setattr(lin, "_TILE_BYTES_BF16", 2048)
    monkeypatch.setattr(lin, "_BF16_MIN_ROWS", 16)
    n, k = shape
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    qw = _weight(fmt, w)
    bias = torch.randn(n, generator=g)
    x = torch.randn(2, 11, k, generator=g)  # 22 rows: the tiled path
    x[..., k // 3] *= 30  # an outlier feature
    wd = qw.dequantize(torch.float32)
    ref = F.linear(x, wd, bias)
    y = qw.linear(x, bias)
    assert y.shape == ref.shape and y.dtype == torch.float32
    if prefill_mode == "fp32":
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:
        bound = 2.0**-7 * (x.abs() @ wd.abs().t()) + 1e-6
        err = (y - ref).abs()
        assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"
        assert err.max() > 0  # bf16 really ran (an fp32 product would match to ~1e-7)


def test_bf16_tiles_only_from_min_rows(prefill_mode):
    import gyrfalcon.quant.linear as lin

    qw = _weight("int8", torch.randn(40, 96, generator=torch.Generator().manual_seed(6)) * 0.05)
    ref32 = None
    for rows in (lin._BF16_MIN_ROWS - 1, lin._BF16_MIN_ROWS):
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
        ref32 = F.linear(x, qw.dequantize(torch.float32))
        err = float((qw.linear(x) - ref32).abs().max())
        exact = prefill_mode == "fp32" or rows < lin._BF16_MIN_ROWS
        assert (err < 1e-5) == exact, (rows, prefill_mode, err)


def test_auto_prefill_is_bf16_only_with_native_bf16(monkeypatch):
    import gyrfalcon.quant.linear as lin

    monkeypatch.setattr(lin, "_PREFILL", "auto")
    monkeypatch.setattr(lin, "_NATIVE_BF16", None)
    assert lin._prefill_bf16(cpu) == cpu.native_bf16()
    with pytest.raises(ValueError, match="prefill mode"):
        lin.set_prefill("int4")


def test_bf16_inputs_come_back_bf16():
    qw = Int4Weight.from_float(torch.randn(64, 128) * 0.05, "nf4", compute_dtype=torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    y = qw.linear(x)
    assert y.dtype == torch.bfloat16
    with backend("reference"):
        ref = qw.linear(x)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_strided_input_rows():
    qw = Int8Weight.from_float(torch.randn(32, 64) * 0.05)
    big = torch.randn(4, 128)
    x = big[:, ::2]  # not contiguous
    torch.testing.assert_close(qw.linear(x), F.linear(x, qw.dequantize()), rtol=1e-3, atol=1e-3)


def test_build_is_cached_and_keyed(tmp_path, monkeypatch):
    monkeypatch.setenv("GYRFALCON_CACHE_DIR", str(tmp_path))
    first = cpu.build()
    assert first.is_file() and first.parent == tmp_path / "kernels"
    mtime = first.stat().st_mtime_ns
    assert cpu.build() == first and first.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert not [p for p in first.parent.iterdir() if p.name.endswith(".tmp")]  # no leftovers


def test_sources_compile_with_the_first_flag_set(tmp_path):
    """The fallback flag sets hide a source that only fails with -march=native (AVX2 / AVX-512 code): the library
    would quietly come out scalar. Where the compiler takes the first set, every source must compile with it."""
    import subprocess

    cc = cpu._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    flags = [*cpu.FLAG_SETS[0], *cpu._isa_flags()]
    probe = tmp_path / "probe.c"
    probe.write_text("int gf_probe(void) { return 1; }\n")
    if subprocess.run([cc, *flags, str(probe), "-o", str(tmp_path / "probe.so")], capture_output=True).returncode:
        pytest.skip("this compiler does not take the first flag set")
    proc = subprocess.run([cc, *flags, *map(str, cpu.SOURCES), "-o", str(tmp_path / "lib.so"), "-lm"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_compiler_falls_back_to_reference_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("GYRFALCON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_tried", False)
    monkeypatch.setattr(cpu, "_error", None)
    with pytest.warns(RuntimeWarning, match="reference path"):
        assert not cpu.available()
    qw = Int8Weight.from_float(torch.randn(16, 64))
    x = torch.randn(1, 64)
    assert torch.equal(qw.linear(x), F.linear(x, qw.dequantize()))  # the reference path, exactly


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_module_decode_shortcut_equals_weight_linear(fmt):
    from gyrfalcon.quant.linear import QuantLinear

    g = torch.Generator().manual_seed(9)
    qw = _weight(fmt, torch.randn(48, 100, generator=g) * 0.05)
    bias = torch.randn(48, generator=g)
    for b in (None, bias, bias.double()):
        mod = QuantLinear(qw, b)
        for shape in [(1, 100), (1, 1, 100), (2, 3, 100), (9, 100)]:
            x = torch.randn(*shape, generator=g)
            with torch.inference_mode():
                y = mod(x)
            assert y.shape == (*shape[:-1], 48) and y.dtype == torch.float32
            assert torch.equal(y, qw.linear(x, None if b is None else b.float()))


def test_llm_int8_module_keeps_its_mixed_product():
    from gyrfalcon.quant import int8
    from gyrfalcon.quant.linear import QuantLinear

    qw = Int8Weight.from_float(torch.randn(32, 64) * 0.05, threshold=6.0)
    x = torch.randn(1, 64)
    x[0, 3] = 20.0  # an outlier feature: LLM.int8 computes it in fp32
    with torch.inference_mode():
        assert torch.equal(QuantLinear(qw)(x), int8.llm_int8_linear(x, qw.q, qw.scale, None, 6.0))


@pytest.mark.skipif(cpu.isa() != "avx512-vnni", reason="the AVX2 fallback is what runs here already")
def test_avx2_fallback_matches_reference(tmp_path):
    """On an AVX-512 machine the AVX2 paths are not compiled by default: build them (GYRFALCON_KERNELS_ISA=avx2)
    in a subprocess and run the matrix-vector grid there."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "GYRFALCON_KERNELS_ISA": "avx2", "GYRFALCON_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    code = ("import sys, pytest; from gyrfalcon.kernels import cpu; assert cpu.isa() == 'avx2', cpu.isa(); "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'gemv_matches or module_decode', "
            f"{__file__!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("fmt1,fmt2", [("int8", "int8"), ("nf4", "nf4"), ("fp4", "nf4-no-dq"), ("nf4", "int8")])
def test_pair_and_sum_kernels_equal_separate_gemv_calls(rows: int, fmt1: str, fmt2: str) -> None:
    """gf_gemv_pair / gf_gemv_sum (a parallel Falcon layer's decode step in two calls): bit for bit two gemv calls
    (and the adds in the same order), whether the two weights share the quantized input or not."""
    from gyrfalcon.quant.linear import QuantLinear

    torch.manual_seed(rows)
    k, k2, n1, n2 = 100, 260, 37, 130
    a = QuantLinear(_weight(fmt1, torch.randn(n1, k)), torch.randn(n1))
    b = QuantLinear(_weight(fmt2, torch.randn(n2, k)))
    c = QuantLinear(_weight(fmt2, torch.randn(n1, k2)), torch.randn(n1))
    x, h, r = torch.randn(rows, k), torch.randn(rows, k2), torch.randn(rows, n1)
    da, db, dc = (m.weight._descriptor(cpu) for m in (a, b, c))
    with torch.no_grad():
        y1, y2 = cpu.gemv_pair(da, a.bias, db, None, x)
        assert torch.equal(y1, cpu.gemv(da, x, a.bias)) and torch.equal(y2, cpu.gemv(db, x))
        y = cpu.gemv_sum(dc, c.bias, h, da, a.bias, x, r)
        assert torch.equal(y, cpu.gemv(dc, h, c.bias).add_(cpu.gemv(da, x, a.bias)).add_(r))
