"""Weight quantization: 8-bit and 4-bit Falcon / Falcon-Mamba that are smaller and faster.

    llm = gyrfalcon.load(path, quantize="nf4")            # quantized while the checkpoint streams in
    llm = gyrfalcon.load(path, quantize="int8", skip=["dense_4h_to_h"])
    quantize_model(model, "int8")                          # a loaded float model, in place
    save_quantized(model, "out/")                          # loads later with no flag

Modes (see `swap.QuantConfig`):
    int8       per-output-channel absmax, weight-only                                  (int8.py)
    llm.int8   int8 weights, LLM.int8() mixed-precision product (outliers > 6.0 in fp32) (int8.py)
    nf4, fp4   blockwise-64 4-bit codes, double-quantized scales, bitsandbytes' format  (int4.py)
The output head (and a tied embedding) is 8-bit in every mode; an untied embedding is int8 rows.

Pure functions: int8.quantize_int8 / dequantize_int8, int4.quantize_4bit / dequantize_4bit. Modules and the
compute paths: linear.py. Planning, streaming, loading and saving: swap.py.
"""

from .linear import (
    Int4Linear,
    Int4Weight,
    Int8Linear,
    Int8Weight,
    QuantEmbedding,
    QuantLinear,
    QuantWeight,
    backend,
    get_backend,
    set_backend,
)
from .swap import (
    MODES,
    QuantConfig,
    checkpoint_quantization,
    load_into,
    parse_skip,
    plan_model,
    quantize_model,
    save_quantized,
)

__all__ = [
    "MODES",
    "Int4Linear",
    "Int4Weight",
    "Int8Linear",
    "Int8Weight",
    "QuantConfig",
    "QuantEmbedding",
    "QuantLinear",
    "QuantWeight",
    "backend",
    "checkpoint_quantization",
    "get_backend",
    "load_into",
    "parse_skip",
    "plan_model",
    "quantize_model",
    "save_quantized",
    "set_backend",
    "weight_bytes",
]


def weight_bytes(model) -> int:
    """Bytes of all weights: parameters and buffers (a tied tensor once) plus quantized weights (a tied one once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr() if not t.is_meta else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, QuantWeight) and id(w) not in seen:
            seen.add(id(w))
            total += w.nbytes
    return total
