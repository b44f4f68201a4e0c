"""Optional fast paths for the quantized layers, each tested against the reference path in `gyrfalcon.quant`.

`cpu`: C kernels (AVX2 + OpenMP) for int8 and 4-bit matrix-vector products and tile dequantization, compiled with
the machine's compiler at first use. The CUDA path lives in `gyrfalcon.quant.cuda` (bitsandbytes when installed).
"""
