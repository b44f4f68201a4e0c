"""Prefill / scoring forwards under the choices fast_linear and the Falcon model make for them, in the same process.

    python benchmarks/prefill_choices.py                  # 250m random Falcon, 1x128, 4x512 and 8x1090 tokens
    python benchmarks/prefill_choices.py --repeats 5

Whole-model forwards (fp32, a fresh cache, last-position logits; rows of a batch 5 tokens apart in length, as
scoring batches are) timed alternately under each setting, best run kept:

* the GEMM for more rows than the gemv kernel takes: oneDNN's or MKL's (`fast_linear.PREFILL_GEMM`);
* the rows per block of a long prefill's MLP (`falcon._MLP_CHUNK`), under the GEMM the CPU gets by default.

8 x 1090 tokens is an ARC-Challenge 25-shot scoring batch (`gyrfalcon eval`).
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
SHAPES = ((1, 128), (4, 512), (8, 1090))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="250m", help="a core_perf.py size (250m, 1.1b, tiny)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunks", default="256,1024,4096")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--model-dir", help="keep / reuse the random model here (default: a temporary folder)")
    args = ap.parse_args(argv)

    import torch

    from gyrfalcon.config import load_config
    from gyrfalcon.models import build_model, falcon, fast_linear
    from gyrfalcon.quant.swap import load_into

    torch.set_num_threads(args.threads)
    tmp = None
    model_dir = Path(args.model_dir) if args.model_dir else Path(tmp := tempfile.mkdtemp(prefix="gf-prefill-"))
    try:
        if not (model_dir / "config.json").is_file():
            print(f"building a random {args.size} Falcon in {model_dir} ...", flush=True)
            subprocess.run([sys.executable, str(HERE / "core_perf.py"), "--role", "make", "--dir", str(model_dir),
                            "--size", args.size], check=True, capture_output=True)
        model = build_model(load_config(model_dir))
        load_into(model, model_dir, torch.float32, torch.device("cpu"), None, ())
        model.eval()
        default_gemm = fast_linear._prefill_gemm()
        default_chunk = falcon._MLP_CHUNK

        def forward_s(b: int, t: int) -> float:
            ids = torch.randint(100, 60000, (b, t))
            lengths = [t - 5 * i for i in range(b)] if b > 1 else None
            with torch.inference_mode():
                cache = model.new_cache(b, t)
                t0 = time.perf_counter()
                model(ids, cache, input_lengths=lengths, last_only=True)
                return time.perf_counter() - t0

        def compare(name: str, values: list, apply) -> None:
            for b, t in SHAPES:
                best = {}
                for r in range(args.repeats):
                    for v in values:
                        apply(v)
                        if r == 0:
                            forward_s(b, min(t, 32))  # warm-up
                        best[v] = min(best.get(v, float("inf")), forward_s(b, t))
                base = best[values[0]]
                cells = "  ".join(f"{v}: {b * t / s:6.0f} tok/s ({base / s:.2f}x)" for v, s in best.items())
                print(f"{name:10s} {b} x {t:4d}  {cells}", flush=True)

        print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  {args.size}, {args.threads} threads, "
              f"best of {args.repeats}; default GEMM here: {default_gemm}, MLP block {default_chunk} rows")
        compare("GEMM", ["onednn", "mkl"], lambda v: setattr(fast_linear, "PREFILL_GEMM", v))
        fast_linear.PREFILL_GEMM = default_gemm
        compare("MLP block", [int(c) for c in args.chunks.split(",")], lambda v: setattr(falcon, "_MLP_CHUNK", v))
        falcon._MLP_CHUNK = default_chunk
    finally:
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
