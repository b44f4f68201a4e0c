"""8-bit weights: per-output-channel absmax (weight-only), and the LLM.int8() mixed-precision product.

    q, scale = quantize_int8(w)             # w [N, K] float -> q [N, K] int8, scale [N] fp32
    w_hat = dequantize_int8(q, scale)       # q * scale[:, None]

Row n is scaled by its own absmax: q = round(w * 127 / absmax_n), scale_n = absmax_n / 127, so |w - w_hat| <=
scale_n / 2 element-wise. This is bitsandbytes' `int8_vectorwise_quant` of the weight (its CB and SCB are our q and
127 * scale).

LLM.int8() (Dettmers et al. 2022), for fidelity with bitsandbytes' 8-bit inference: the input features (columns of
x) in which any |x| exceeds `threshold` (6.0 by default) are multiplied in high precision against the dequantized
weight columns; every other feature is quantized row-wise to int8 (absmax per row of x) and multiplied in integer
arithmetic against q. `llm_int8_linear` is that product, written plainly (the reference; it is not the fast path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DEFAULT_THRESHOLD = 6.0


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] int8 in [-127, 127], scale [N] fp32). An all-zero row gets scale 1."""
    if w.dim() != 2:
        raise ValueError(f"quantize_int8 expects a 2-D weight, got shape {tuple(w.shape)}")
    w = w.float()
    absmax = w.abs().amax(dim=1)
    absmax = torch.where(absmax > 0, absmax, torch.full_like(absmax, 127.0))
    q = torch.round(w * (127.0 / absmax).unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, absmax / 127.0


def quantize_int8_chunked(w: torch.Tensor, rows: int = 4096,
                          done: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8` a block of rows at a time, so the fp32 temporaries stay small for huge matrices (the 65k-row
    embedding of Falcon-40B); the result is identical. `done(a, b)` is called once rows a..b have been read."""
    n = w.shape[0]
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    for a in range(0, n, rows):
        q[a : a + rows], scale[a : a + rows] = quantize_int8(w[a : a + rows])
        if done is not None:
            done(a, min(n, a + rows))
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [N, K] int8, scale [N] -> w_hat [N, K] (computed in fp32, then cast to `dtype`)."""
    return (q.float() * scale.float().unsqueeze(1)).to(dtype)


def llm_int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                    threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """LLM.int8(): x [..., K] -> [..., N] in x's dtype. Outlier features (any |x| > threshold in that column) in
    fp32 against the dequantized weight columns; the rest row-wise int8 x int8 with exact integer sums (computed
    in fp64, where integers below 2^53 are exact)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    outliers = (x2.abs() > threshold).any(dim=0) if threshold > 0 else torch.zeros(x2.shape[1], dtype=torch.bool,
                                                                                      device=x2.device)
    rest = x2.masked_fill(outliers.unsqueeze(0), 0.0)
    row_absmax = rest.abs().amax(dim=1, keepdim=True)
    row_absmax = torch.where(row_absmax > 0, row_absmax, torch.ones_like(row_absmax))
    xq = torch.round(rest * (127.0 / row_absmax)).clamp_(-127, 127)
    acc = xq.double() @ q.double().t()  # the int32 accumulation of the int8 GEMM, exactly
    y = (acc * (row_absmax.double() / 127.0) * scale.double().unsqueeze(0)).float()
    if bool(outliers.any()):
        cols = outliers.nonzero().squeeze(1)
        y = y + x2[:, cols] @ dequantize_int8(q[:, cols], scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], q.shape[0])
