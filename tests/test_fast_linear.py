"""The fast fp32 linear (gyrfalcon/models/fast_linear.py, kernels/gemv_f32.c) against its reference, `mod(x)`.

Tolerance: both sides are fp32 dot products of length K summed in a different order, so they differ by fp32
rounding: we hold them to 1e-5 * (sum_k |w| |x| + |bias|) per output, a bound on that rounding for these K.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gyrfalcon.kernels import cpu as cpu_kernels
from gyrfalcon.models import fast_linear


def _bound(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    b = mod.bias.abs() if mod.bias is not None else 0.0
    return 1e-5 * (x.abs() @ mod.weight.abs().t() + b) + 1e-7


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 8, 9, 11, 13, 16, 17, 130])
@pytest.mark.parametrize("k,n,bias", [(64, 48, True), (1000, 37, False), (7, 5, True), (1, 3, False), (288, 260, True)])
def test_fast_linear_equals_module(rows: int, k: int, n: int, bias: bool) -> None:
    torch.manual_seed(rows * 1000 + k)
    mod = nn.Linear(k, n, bias=bias)
    x = torch.randn(rows, k)
    with torch.no_grad():
        ref = mod(x)
        got = fast_linear.linear(mod, x)
    assert got.shape == ref.shape
    assert ((got - ref).abs() <= _bound(mod, x)).all(), (got - ref).abs().max()


def test_fast_linear_strided_and_3d_inputs() -> None:
    torch.manual_seed(0)
    mod = nn.Linear(96, 40)
    base = torch.randn(3, 2, 200)
    x = base[:, :, 10:106]  # rows not contiguous with each other
    with torch.no_grad():
        ref = mod(x)
        got = fast_linear.linear(mod, x)
    assert got.shape == (3, 2, 40)
    assert ((got - ref).abs() <= _bound(mod, x)).all()


def test_fast_linear_keeps_autograd_and_other_modules_on_the_reference_path() -> None:
    mod = nn.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    y = fast_linear.linear(mod, x)
    y.sum().backward()  # the reference path: autograd works
    assert x.grad is not None and mod.weight.grad is not None
    seq = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        assert torch.equal(fast_linear.linear(seq, x), seq(x))


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build here")
def test_gemv_f32_kernel_rejects_bad_shapes() -> None:
    w = torch.randn(5, 8)
    with pytest.raises(ValueError, match="at most"):
        cpu_kernels.gemv_f32(torch.randn(cpu_kernels.F32_MAX_ROWS + 1, 8), w)
    with pytest.raises(ValueError):
        cpu_kernels.gemv_f32(torch.randn(1, 7), w)


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build here")
@pytest.mark.parametrize("rows", [1, 2, 4, 7, 8, 9, 12, 16])
@pytest.mark.parametrize("k,n1,n2,k2", [(64, 48, 200, 96), (1000, 37, 5, 13), (7, 1, 8, 7), (96, 301, 300, 250)])
def test_pair_and_sum_kernels_equal_the_separate_calls(rows: int, k: int, n1: int, n2: int, k2: int) -> None:
    """One call for two products (linear_pair) or two products and a residual summed (linear_sum): bit for bit what
    the separate kernel calls and in-place adds give (the same routine for every output), within the module bound."""
    torch.manual_seed(rows + k)
    a, b = nn.Linear(k, n1), nn.Linear(k, n2, bias=False)
    x = torch.randn(rows, 1, k)
    with torch.no_grad():
        y1, y2 = fast_linear.linear_pair(a, b, x)
        assert torch.equal(y1, fast_linear.linear(a, x)) and torch.equal(y2, fast_linear.linear(b, x))
        assert ((y1 - a(x)).abs() <= _bound(a, x)).all()
        c = nn.Linear(k2, n1, bias=n1 % 2 == 1)
        h, r = torch.randn(rows, 1, k2), torch.randn(rows, 1, n1)
        y = fast_linear.linear_sum(c, h, a, x, r)
        assert torch.equal(y, fast_linear.linear(c, h).add_(fast_linear.linear(a, x)).add_(r))
        assert ((y - (c(h) + a(x) + r)).abs() <= _bound(c, h) + _bound(a, x) + 1e-6 * r.abs()).all()


def test_pair_and_sum_leave_other_cases_to_the_caller() -> None:
    a, b = nn.Linear(8, 4), nn.Linear(8, 6)
    x = torch.randn(2, 8)
    assert fast_linear.linear_pair(a, b, x) is None  # autograd on: the module path
    with torch.no_grad():
        assert fast_linear.linear_pair(a, nn.Sequential(b), x) is None  # another module type
        assert fast_linear.linear_pair(a, b, torch.randn(2, 8, dtype=torch.float64)) is None
        assert fast_linear.linear_pair(a, b, torch.randn(cpu_kernels.F32_MAX_ROWS + 1, 8)) is None
        assert fast_linear.linear_sum(a, x, nn.Linear(8, 6), x, torch.randn(2, 4)) is None  # outputs differ
        assert fast_linear.linear_sum(a, x, a, x, torch.randn(2, 5)) is None  # residual shape


@pytest.mark.parametrize("gemm", ["onednn", "mkl"])
def test_prefill_gemm_choices_equal_module(gemm: str, monkeypatch) -> None:
    monkeypatch.setattr(fast_linear, "PREFILL_GEMM", gemm)
    torch.manual_seed(3)
    mod = nn.Linear(300, 70)
    x = torch.randn(2, 65, 300)
    with torch.no_grad():
        ref, got = mod(x), fast_linear.linear(mod, x)
    assert ((got - ref).abs() <= _bound(mod, x)).all()
    monkeypatch.setattr(fast_linear, "PREFILL_GEMM", "blas")
    with pytest.raises(ValueError, match="GYRFALCON_PREFILL_GEMM"), torch.no_grad():
        fast_linear.linear(mod, x)
