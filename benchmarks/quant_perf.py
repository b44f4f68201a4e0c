"""Quantized vs fp32 on the core benchmark's random Falcons: decode and prefill speed, weight bytes, load memory.

    python benchmarks/quant_perf.py                                  # 250m and 1.1b; fp32, int8, nf4, fp4
    python benchmarks/quant_perf.py --sizes 250m --modes fp32,int8,nf4 --threads 2 --json out.json

Each size is the random multi-query Falcon of `core_perf.py` (7B layout, vocab 65024, tied embeddings), built with
transformers' init and saved once as an fp32 HF directory. Then every mode runs in a fresh subprocess, one after
the other (so memory peaks and threads never mix), with the fp32 checkpoint quantized while it streams in
(`load_into(..., quantize=mode)`, what `gyrfalcon.load(path, quantize=...)` runs):

* load: seconds, and peak RSS over the RSS before loading (the target: nf4 <= 0.35x the fp32 weight bytes);
* weight bytes: every parameter, buffer and quantized tensor once (the targets on 1.1b: int8 <= 0.27x, nf4 <= 0.15x);
* prefill: tokens/s of one 128-token prompt at batch 1, what `Generation` runs (`forward(..., last_only=True)`);
* decode: tokens/s of greedy decoding at batch 1 (and batch `--batch`), driven by `Generation`, first token to last;
* quality: max |diff| of the last-token logits against fp32, and how many greedy tokens match fp32's.

Throughput is the best of `--repeats` runs. Every ratio is against fp32 measured in the same run. llama.cpp is
not measured: `llama-cpp-python` is not installed here (its build takes ~15 minutes on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from core_perf import SIZES, VOCAB  # noqa: E402  (the model definitions; `core_perf.py --role make` builds them)


def _bandwidth(threads: int, gib: float = 0.5, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best time of a sum over a tensor much larger than the caches."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"

MODES = ("fp32", "int8", "nf4", "fp4", "llm.int8")


def role_run(model_dir: str, mode: str, threads: int, prompt_len: int, new_tokens: int, batch: int, repeats: int,
             out: str) -> None:
    import torch

    torch.set_num_threads(threads)
    from gyrfalcon.config import load_config
    from gyrfalcon.kernels import cpu
    from gyrfalcon.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from gyrfalcon.models import build_model
    from gyrfalcon.quant import load_into, weight_bytes
    from gyrfalcon.runtime.generate import Generation
    from gyrfalcon.runtime.sampling import SamplingParams

    cpu.available()  # compiled and loaded before the baseline
    gen = torch.Generator().manual_seed(1234)
    prompts = torch.randint(0, VOCAB, (batch, prompt_len), generator=gen)
    rss0 = current_rss_bytes()
    reset_ok = reset_peak_rss()
    t0 = time.perf_counter()
    model = build_model(load_config(model_dir))
    load_into(model, model_dir, torch.float32, "cpu", None if mode == "fp32" else mode)
    model.eval()
    res = {"mode": mode, "load_s": time.perf_counter() - t0, "load_peak_rss": peak_rss_bytes() - rss0,
           "peak_reset": reset_ok, "weight_bytes": weight_bytes(model), "threads": torch.get_num_threads(),
           "kernels": cpu.available() and cpu.simd()}
    ids1 = prompts[:1]
    with torch.inference_mode():
        def prefill():
            cache = model.new_cache(1, prompt_len + new_tokens)
            return model(ids1, cache, last_only=True)

        t = time.perf_counter()
        logits = prefill()
        res["first_prefill_s"] = time.perf_counter() - t
        torch.save(logits.float().clone(), out + ".logits.pt")
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            prefill()
            best = min(best, time.perf_counter() - t)
        res["prefill_tok_s"] = prompt_len / best

        def decode(rows):
            g = Generation(model, rows.tolist(), SamplingParams(max_new_tokens=new_tokens, temperature=0.0,
                                                                 ignore_eos=True))
            stamps = [time.perf_counter() for _ in g]
            return stamps, g.sequences[0].tokens

        for b in sorted({1, batch}):
            best = float("inf")
            for _ in range(repeats):
                stamps, tokens = decode(prompts[:b])
                best = min(best, stamps[-1] - stamps[0])
                if b == 1:
                    res["greedy_tokens"] = tokens
            res[f"decode_b{b}_tok_s"] = b * (new_tokens - 1) / best
    res["gen_peak_rss"] = peak_rss_bytes() - rss0
    Path(out).write_text(json.dumps(res))


def _sub(args: list[str], env: dict) -> None:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"subprocess {args[:4]} failed with exit status {proc.returncode}")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table(results: dict, modes: list[str]) -> str:
    head = ["metric", "size", *modes, *[f"{m}/fp32" for m in modes if m != "fp32"]]
    rows = []
    for size, r in results.items():
        base = r["fp32"]

        def row(name, key, fmt, r=r, base=base, size=size):
            vals = [r[m][key] for m in modes]
            ratios = []
            for m in modes:
                if m == "fp32":
                    continue
                a, b = r[m][key], base[key]
                ratios.append(f"{(a / b) if b else float('nan'):.2f}x")
            rows.append([name, size, *[fmt(v) for v in vals], *ratios])

        row("decode tok/s, b1", "decode_b1_tok_s", lambda v: f"{v:.2f}")
        bkey = next((k for k in base if k.startswith("decode_b") and k != "decode_b1_tok_s"), None)
        if bkey:
            row(f"decode tok/s, {bkey[7:-6]}", bkey, lambda v: f"{v:.2f}")
        row("prefill tok/s (128, b1)", "prefill_tok_s", lambda v: f"{v:.1f}")
        row("weight bytes", "weight_bytes", _gib)
        row("peak RSS, load", "load_peak_rss", _gib)
        row("load s", "load_s", lambda v: f"{v:.2f}")
        rows.append(["greedy tokens = fp32", size, *[f"{r[m]['match_prefix']}/{len(base['greedy_tokens'])}"
                                                      for m in modes], *[""] * (len(modes) - 1)])
        rows.append(["last logits max|diff|", size, *[f"{r[m]['logits_max_abs_diff']:.3f}" for m in modes],
                     *[""] * (len(modes) - 1)])
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    line = lambda x: "  ".join(str(c).ljust(w) for c, w in zip(x, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def targets(results: dict) -> list[str]:
    out = []
    for size, r in results.items():
        f = r.get("fp32")
        if not f:
            continue

        def check(name, ok, detail, size=size):
            out.append(f"[{'PASS' if ok else 'FAIL'}] {size}: {name} ({detail})")

        def d(m, r=r, f=f):
            return r[m]["decode_b1_tok_s"] / f["decode_b1_tok_s"]

        if "int8" in r:
            check("int8 decode b1 >= 3x fp32", d("int8") >= 3, f"{d('int8'):.2f}x")
            check("int8 prefill >= fp32", r["int8"]["prefill_tok_s"] >= f["prefill_tok_s"],
                  f"{r['int8']['prefill_tok_s'] / f['prefill_tok_s']:.2f}x")
        if "nf4" in r:
            check("nf4 decode b1 >= 4x fp32", d("nf4") >= 4, f"{d('nf4'):.2f}x")
            if "int8" in r:
                check("nf4 decode faster than int8", d("nf4") > d("int8"), f"{d('nf4') / d('int8'):.2f}x int8")
            check("nf4 prefill >= fp32", r["nf4"]["prefill_tok_s"] >= f["prefill_tok_s"],
                  f"{r['nf4']['prefill_tok_s'] / f['prefill_tok_s']:.2f}x")
            check("nf4 load peak RSS <= 0.35x fp32 weight bytes",
                  r["nf4"]["load_peak_rss"] <= 0.35 * f["weight_bytes"],
                  f"{r['nf4']['load_peak_rss'] / f['weight_bytes']:.3f}x")
        if size == "1.1b":
            for m, lim in (("int8", 0.27), ("nf4", 0.15)):
                if m in r:
                    ratio = r[m]["weight_bytes"] / f["weight_bytes"]
                    check(f"{m} weight bytes <= {lim}x fp32", ratio <= lim, f"{ratio:.3f}x")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="250m,1.1b")
    ap.add_argument("--modes", default="fp32,int8,nf4,fp4")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="the larger decode batch (batch 1 is always measured)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--keep", help="reuse/keep the model directories under this folder")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "run":
        return role_run(args.dir, args.mode, args.threads, args.prompt_len, args.new_tokens, args.batch,
                        args.repeats, args.out)

    sizes = [s for s in args.sizes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    if "fp32" not in modes:
        modes.insert(0, "fp32")
    bad = [s for s in sizes if s not in SIZES] + [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown sizes/modes: {bad}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error"}
    started = time.time()
    load1 = os.getloadavg()[0]
    bw = _bandwidth(args.threads, gib=0.5)
    print(f"read bandwidth ({args.threads} threads): {bw / 1e9:.2f} GB/s", flush=True)
    results: dict = {}
    for size in sizes:
        root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gf-quant-perf-"))
        model_dir = root / f"falcon-{size}"
        try:
            if not (model_dir / "model.safetensors").is_file():
                model_dir.mkdir(parents=True, exist_ok=True)
                t = time.perf_counter()
                proc = subprocess.run([sys.executable, str(HERE / "core_perf.py"), "--role", "make", "--dir",
                                       str(model_dir), "--size", size], env=env, capture_output=True, text=True)
                if proc.returncode:
                    sys.stderr.write(proc.stderr)
                    raise SystemExit("building the model failed")
                print(f"[{size}] built and saved in {time.perf_counter() - t:.1f}s", flush=True)
            r: dict = {}
            for mode in modes:
                out = str(root / f"{size}-{mode}.json")
                _sub(["--role", "run", "--dir", str(model_dir), "--mode", mode, "--out", out, "--threads",
                      str(args.threads), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                      "--batch", str(args.batch), "--repeats", str(args.repeats)], env)
                r[mode] = json.loads(Path(out).read_text())
                print(f"[{size}] {mode}: " + ", ".join(f"{k}={v:.4g}" for k, v in r[mode].items()
                                                       if isinstance(v, float)), flush=True)
            import torch

            base_logits = torch.load(str(root / f"{size}-fp32.json") + ".logits.pt")
            for mode in modes:
                lg = torch.load(str(root / f"{size}-{mode}.json") + ".logits.pt")
                r[mode]["logits_max_abs_diff"] = float((lg - base_logits).abs().max())
                a, b = r[mode]["greedy_tokens"], r["fp32"]["greedy_tokens"]
                r[mode]["match_prefix"] = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y),
                                               len(a))
            results[size] = r
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "threads": args.threads, "bandwidth": bw, "loadavg_1m_at_start": load1,
            "loadavg_1m_at_end": os.getloadavg()[0], "wall_s": time.time() - started,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": args.batch,
            "repeats": args.repeats, "python": platform.python_version(),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "llama_cpp": "not measured: llama-cpp-python is not installed (its build takes ~15 minutes here)"}
    print()
    print(f"{meta['date']}  {meta['cpu']}  {meta['cpu_count']} cores, {args.threads} threads; read bandwidth "
          f"{bw / 1e9:.2f} GB/s; load avg (1m) {load1:.2f} at start, {meta['loadavg_1m_at_end']:.2f} at end")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; best of {args.repeats}; "
          "ratios against fp32 in this run")
    print(table(results, modes))
    print()
    print("\n".join(targets(results)))
    print(meta["llama_cpp"])
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
