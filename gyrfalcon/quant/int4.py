"""4-bit weights: blockwise NF4 and FP4 with double quantization of the block scales (QLoRA).

    q = quantize_4bit(w, "nf4")             # a Quant4bit: packed codes, absmax (double-quantized), shape
    w_hat = dequantize_4bit(q)

The format is bitsandbytes' (`bitsandbytes.functional.quantize_4bit`, blocksize 64, `compress_statistics=True`),
so codes and scales are interchangeable with it (a test checks equality where bitsandbytes runs on CPU):

* the tensor is flattened and cut into blocks of 64 consecutive elements; absmax_b = max |w| in block b;
* each element is scaled to [-1, 1] by the block's absmax and replaced by the index of the nearest of the 16 values
  of the code book (NF4: quantiles of N(0, 1), QLoRA; FP4: 1 sign, 2 exponent, 1 mantissa bit, normalized to 1);
  ties between two code values go to the lower value;
* two indices per byte, the first element in the high nibble;
* double quantization: offset = mean(absmax); (absmax - offset) is quantized blockwise (256 scales per block) to
  8 bits with the signed dynamic map (`dynamic_map`), leaving one fp32 absmax per 256 blocks: 8.125 bits per 64
  weights for the scales instead of 32.

A [N, K] linear weight with K not a multiple of 64 is zero-padded per row to KP columns first (`pad_rows`), so that
blocks never straddle two rows; for K % 64 == 0 (every real Falcon) that is the same tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256

# QLoRA's NF4 (bitsandbytes `get_4bit_type("nf4")`): sorted, 0 at index 7, +-1 at the ends.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes' FP4 (e2m1, exponent bias 2 as bitsandbytes defines it), in bit-pattern order: index = sign << 3 |
# exponent << 1 | mantissa; the values below are divided by the largest (12) when the code book is built.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

QUANT_TYPES = ("nf4", "fp4")
_codes: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_book(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 fp32 code values, indexed by the 4-bit code."""
    device = torch.device(device)
    key = (quant_type, device)
    if key not in _codes:
        if quant_type == "nf4":
            t = torch.tensor(NF4_VALUES, dtype=torch.float32)
        elif quant_type == "fp4":
            t = torch.tensor(FP4_RAW, dtype=torch.float32)
            t = t / t.abs().max()
        elif quant_type == "dynamic":
            t = dynamic_map()
        else:
            raise ValueError(f"unknown 4-bit type {quant_type!r}; choose from {QUANT_TYPES}")
        _codes[key] = t.to(device)
    return _codes[key]


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic-exponent map (Dettmers 2016; bitsandbytes `create_dynamic_map(signed=True)`):
    256 sorted fp32 values in [-1, 1] used to store the double-quantized block scales.

    For exponent e = 0..6, 2^e + 1 evenly spaced points in [0.1, 1] give 2^e bin midpoints, scaled by 10^(e-6) and
    taken with both signs; then 0 and 1 are added (2 * 127 + 2 = 256 values)."""
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-6 + e)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into `code` of the nearest value for each element (ties to the lower value)."""
    order = torch.argsort(code)
    s = code[order]
    mids = (s[:-1] + s[1:]) / 2
    idx = torch.bucketize(scaled, mids)
    return order[idx] if not torch.equal(order, torch.arange(len(code), device=code.device)) else idx


def _block_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat [n] fp32 -> (absmax per block [ceil(n / blocksize)], the elements scaled into [-1, 1])."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return absmax, scaled


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape) -> (uint8 indices into `dynamic_map()`, fp32 absmax per block of `blocksize`)."""
    flat = x.reshape(-1).float()
    absmax, scaled = _block_absmax(flat, blocksize)
    q = _nearest(scaled, code_book("dynamic", x.device)).to(torch.uint8)
    return q.view(x.shape), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor,
                              blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    vals = code_book("dynamic", q.device)[q.reshape(-1).long()]
    n = vals.numel()
    scales = absmax.repeat_interleave(blocksize)[:n]
    return (vals * scales).view(q.shape)


@dataclass
class Quant4bit:
    """A 4-bit tensor. `absmax` is fp32 per block, or (double quantization) uint8 indices into the dynamic map with
    `absmax2` (fp32 per 256 blocks) and `offset` (fp32 scalar tensor)."""

    packed: torch.Tensor  # uint8 [ceil(numel / 2)]
    absmax: torch.Tensor  # [blocks] fp32, or uint8 when double-quantized
    shape: tuple[int, ...]
    quant_type: str = "nf4"
    blocksize: int = BLOCKSIZE
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    def absmax_fp32(self) -> torch.Tensor:
        """The block scales as fp32 (dequantizing them when double-quantized, as bitsandbytes does)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax, self.absmax2) + self.offset


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = BLOCKSIZE,
                  double_quant: bool = True) -> Quant4bit:
    """Quantize a float tensor of any shape (flattened, bitsandbytes' layout). See the module docstring."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    flat = w.reshape(-1).float()
    absmax, scaled = _block_absmax(flat, blocksize)
    if scaled.numel() % 2:  # an odd count is padded with one 0.0 (NF4's code 7), as bitsandbytes does
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    idx = _nearest(scaled, code_book(quant_type, w.device)).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    q = Quant4bit(packed, absmax, tuple(w.shape), quant_type, blocksize)
    return double_quantize(q) if double_quant else q


def double_quantize(q: Quant4bit) -> Quant4bit:
    """Replace fp32 block scales by 8-bit ones (QLoRA's double quantization)."""
    if q.double_quant:
        return q
    offset = q.absmax.mean()
    qabs, absmax2 = quantize_blockwise_8bit(q.absmax - offset, NESTED_BLOCKSIZE)
    return Quant4bit(q.packed, qabs, q.shape, q.quant_type, q.blocksize, absmax2, offset)


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [ceil(n / 2)] -> the n code indices (long)."""
    idx = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    return idx[:numel].long()


def dequantize_4bit(q: Quant4bit, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float tensor the codes stand for: code[index] * absmax of its block, in fp32, then cast to `dtype`."""
    n = 1
    for s in q.shape:
        n *= s
    vals = code_book(q.quant_type, q.packed.device)[unpack_4bit(q.packed, n)]
    scales = q.absmax_fp32().repeat_interleave(q.blocksize)[:n]
    return (vals * scales).view(q.shape).to(dtype)


def padded_width(k: int, blocksize: int = BLOCKSIZE) -> int:
    return -(-k // blocksize) * blocksize


def pad_rows(w: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """[N, K] -> [N, KP] with zero columns appended, KP a multiple of `blocksize` (w itself when K already is)."""
    k = w.shape[1]
    kp = padded_width(k, blocksize)
    return w if kp == k else torch.nn.functional.pad(w, (0, kp - k))
