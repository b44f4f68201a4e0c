"""Decode speed with and without the decode-step kernels (kernels/decode_cpu.c), in the same process.

    python benchmarks/decode_kernels.py                      # 250m random Falcon; fp32, int8, nf4; batch 1 and 8
    python benchmarks/decode_kernels.py --modes nf4 --batches 1 --repeats 5
    python benchmarks/decode_kernels.py --toggle pairs       # instead: a layer's linears in 2 calls vs 4

A random ~250M multi-query Falcon (the core benchmark's, `core_perf.py`) is built once and loaded per mode
(quantized while it streams in). For each batch size, greedy decoding through `Generation` (what every user path
runs) after a 128-token prompt is timed alternately with the kernels on and off (`fast_decode.ENABLED`; the linears'
kernels stay on in both), `--repeats` times each, best run kept: the ratio is of two runs a few seconds apart on the
same weights, so the host's drift mostly cancels. `--toggle pairs` switches `fast_linear.PAIRS` instead: a parallel
layer's four decode linears in two kernel calls (query_key_value with dense_h_to_4h; dense_4h_to_h with dense, summed
with the residual) or in four.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def decode_tok_s(model, prompts: list[list[int]], new_tokens: int) -> float:
    from gyrfalcon.runtime.generate import Generation
    from gyrfalcon.runtime.sampling import SamplingParams

    gen = Generation(model, prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    steps = iter(gen)
    next(steps)  # the prefill and first token
    t0 = time.perf_counter()
    for _ in steps:
        pass
    return (new_tokens - 1) * len(prompts) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="250m", help="a core_perf.py size (250m, 1.1b, tiny)")
    ap.add_argument("--modes", default="fp32,int8,nf4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--model-dir", help="keep / reuse the random model here (default: a temporary folder)")
    ap.add_argument("--toggle", choices=("kernels", "pairs"), default="kernels",
                    help="what is switched on and off: the decode-step kernels, or the paired linear calls")
    args = ap.parse_args(argv)

    import torch

    from gyrfalcon.config import load_config
    from gyrfalcon.models import build_model, fast_decode, fast_linear
    from gyrfalcon.quant.swap import load_into

    torch.set_num_threads(args.threads)
    tmp = None
    model_dir = Path(args.model_dir) if args.model_dir else Path(tmp := tempfile.mkdtemp(prefix="gf-decode-"))
    if not (model_dir / "config.json").is_file():
        print(f"building a random {args.size} Falcon in {model_dir} ...", flush=True)
        subprocess.run([sys.executable, str(HERE / "core_perf.py"), "--role", "make", "--dir", str(model_dir),
                        "--size", args.size], check=True, capture_output=True)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = {b: [torch.randint(100, 60000, (128,)).tolist() for _ in range(b)] for b in batches}
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  {args.size}, {args.threads} threads, "
          f"greedy, 128-token prompt, {args.new_tokens} new tokens, best of {args.repeats}")
    flag = (fast_decode, "ENABLED") if args.toggle == "kernels" else (fast_linear, "PAIRS")
    print(f"mode   batch  {args.toggle:>7s} on tok/s  off tok/s  on/off")
    try:
        for mode in args.modes.split(","):
            model = build_model(load_config(model_dir))
            load_into(model, model_dir, torch.float32, torch.device("cpu"), None if mode == "fp32" else mode, ())
            model.eval()
            for b in batches:
                decode_tok_s(model, prompts[b], 4)  # warm-up
                best = {True: 0.0, False: 0.0}
                for _ in range(args.repeats):
                    for on in (True, False):
                        setattr(*flag, on)
                        best[on] = max(best[on], decode_tok_s(model, prompts[b], args.new_tokens))
                setattr(*flag, True)
                print(f"{mode:5s}  {b:5d}  {best[True]:16.1f}  {best[False]:9.1f}  {best[True] / best[False]:6.2f}x",
                      flush=True)
            del model
    finally:
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
