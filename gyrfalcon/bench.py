"""`gyrfalcon bench MODEL --modes fp32,int8,nf4,fp4`: memory, load time and generation speed per quantization mode.

The seed's `measure_perf`, made a command. For each mode, in a fresh subprocess (so that one mode's memory and
threads never mix with another's), the model is loaded (`gyrfalcon.load(MODEL, quantize=mode)`; "fp32", "bf16"
and "fp16" load unquantized in that dtype) and each prompt is generated greedily `--runs` times. Recorded per mode
and prompt:

* peak memory: on CPU the peak resident set (VmHWM) of the worker minus its resident set before loading (so the
  interpreter and torch themselves are not counted; the absolute peak is in the JSON too); on CUDA
  `torch.cuda.max_memory_allocated()`. The peak is cumulative: load, then every prompt so far;
* load time (seconds until the model is ready), generation time (the best of the runs), new tokens, tokens/s;
* the generated text (of the last run).

Outputs: `bench.json` (everything, with the machine and settings), `bench.csv` (one row per mode and prompt),
`bench.png` (memory on the left axis, generation time on the right, one series per mode, x = prompt; like the
seed's `plots/falcon_memory_time.png`; needs matplotlib) and a table on stdout with speed and size ratios
against the first mode.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_PROMPTS = (
    "Write a story about a magical object that grants wishes, but with unpredictable consequences.",
    "Describe your ideal vacation destination and why it is your top choice.",
    "Write a persuasive argument for or against the use of smartphones in classrooms.",
    "Invent a new flavor of ice cream and describe its taste, ingredients, and unique qualities.",
    "What are the steps to perform an A/B test?",
)
FLOAT_MODES = ("fp32", "bf16", "fp16")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model dir or hub id (default: bundled model)")
    p.add_argument("--model", "-m", help=argparse.SUPPRESS)
    p.add_argument("--modes", default="fp32,int8,nf4,fp4",
                   help="comma-separated: fp32, bf16, fp16 (unquantized) and int8, llm.int8, nf4, fp4")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: the seed's five prompts)")
    p.add_argument("--runs", type=int, default=1, help="generations per prompt; the best time is kept")
    p.add_argument("--max-new-tokens", "-n", type=int, default=64)
    p.add_argument("--stop-at-eos", action="store_true", help="stop at the end-of-text token (default: always "
                   "generate --max-new-tokens, so every mode does the same work)")
    p.add_argument("--device", help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="compute dtype of the quantized modes")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--revision", help="hub revision for a hub id")
    p.add_argument("--out", default="bench-results", help="directory for bench.json, bench.csv, bench.png")
    p.add_argument("--in-process", action="store_true", help="run every mode in this process (faster, but "
                   "the memory peaks then accumulate across modes)")


def _read_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line)")
    return prompts


def measure_mode(model: str | None, mode: str, prompts: list[str], runs: int, max_new_tokens: int,
                 device: str | None = None, dtype: str | None = None, threads: int | None = None,
                 revision: str | None = None, ignore_eos: bool = True) -> dict:
    """Load `model` in `mode` and generate every prompt; the numbers of one mode (see the module docstring)."""
    import torch

    import gyrfalcon
    import gyrfalcon.api  # noqa: F401 - imported before the memory baseline

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure(torch, gyrfalcon, model, mode, prompts, runs, max_new_tokens, device, dtype, revision,
                        ignore_eos)
    finally:
        torch.set_num_threads(old_threads)


def _measure(torch, gyrfalcon, model, mode, prompts, runs, max_new_tokens, device, dtype, revision,
             ignore_eos) -> dict:
    from gyrfalcon.kernels import cpu
    from gyrfalcon.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
    from gyrfalcon.quant import weight_bytes

    cpu.available()  # build/load the kernels before the baseline, so their code is not counted as the model's
    quantize = None if mode in FLOAT_MODES else mode
    load_dtype = mode if mode in FLOAT_MODES else dtype
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    rss0 = current_rss_bytes()
    reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def peak() -> int:
        return int(torch.cuda.max_memory_allocated()) if cuda else max(0, peak_rss_bytes() - rss0)

    t0 = time.perf_counter()
    llm = gyrfalcon.load(model, device=device, dtype=load_dtype, revision=revision, quantize=quantize)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    out = {"mode": mode, "load_s": load_s, "load_peak_memory": peak(), "weight_bytes": weight_bytes(llm.model),
           "device": str(llm.device), "compute_dtype": str(llm.model.lm_head.weight.dtype).replace("torch.", ""),
           "threads": torch.get_num_threads(), "prompts": []}
    for i, prompt in enumerate(prompts):
        best = float("inf")
        comp = None
        for _ in range(max(1, runs)):
            t = time.perf_counter()
            (comp,) = llm.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=ignore_eos)
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        n = len(comp.token_ids)
        out["prompts"].append({"index": i + 1, "prompt": prompt, "prompt_tokens": comp.prompt_tokens,
                               "new_tokens": n, "gen_s": best, "tokens_per_s": n / best if best > 0 else 0.0,
                               "peak_memory": peak(), "text": comp.text})
    out["peak_memory"] = peak()
    out["peak_rss_absolute"] = None if cuda else peak_rss_bytes()
    out["memory_kind"] = "cuda max_memory_allocated" if cuda else "peak RSS minus RSS before loading"
    return out


def _worker(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    print("GF-BENCH " + json.dumps(measure_mode(**spec)), flush=True)


def _run_subprocess(spec: dict) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.run([sys.executable, "-m", "gyrfalcon.bench", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("GF-BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench worker for mode {spec['mode']!r} failed (exit {proc.returncode}):\n"
                           + (proc.stderr or proc.stdout)[-3000:])
    return json.loads(lines[-1][len("GF-BENCH "):])


def _fmt_mem(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def table(results: list[dict]) -> str:
    """One row per mode: load time, peak memory, weights, mean generation time and tokens/s, and ratios against
    the first mode (speed: higher is better; size: lower is better)."""
    head = ["mode", "load s", "peak memory", "weights", "gen s (mean)", "tok/s (mean)", "speed vs " +
            results[0]["mode"], "weights vs " + results[0]["mode"]]
    rows = []
    base_tps = _mean(p["tokens_per_s"] for p in results[0]["prompts"])
    base_w = results[0]["weight_bytes"]
    for r in results:
        tps = _mean(p["tokens_per_s"] for p in r["prompts"])
        rows.append([r["mode"], f"{r['load_s']:.2f}", _fmt_mem(r["peak_memory"]), _fmt_mem(r["weight_bytes"]),
                     f"{_mean(p['gen_s'] for p in r['prompts']):.2f}", f"{tps:.2f}",
                     f"{tps / base_tps:.2f}x" if base_tps else "-", f"{r['weight_bytes'] / base_w:.3f}x"])
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda x: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(x, widths, strict=True)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def write_csv(results: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["mode", "prompt_index", "prompt", "load_s", "peak_memory_bytes", "weight_bytes", "gen_s",
                    "new_tokens", "tokens_per_s", "text"])
        for r in results:
            for p in r["prompts"]:
                w.writerow([r["mode"], p["index"], p["prompt"], f"{r['load_s']:.4f}", p["peak_memory"],
                            r["weight_bytes"], f"{p['gen_s']:.4f}", p["new_tokens"], f"{p['tokens_per_s']:.3f}",
                            p["text"]])


def plot(results: list[dict], path: Path, title: str) -> bool:
    """The twin-axis figure; False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax_mem = plt.subplots(figsize=(10, 5.5))
    ax_time = ax_mem.twinx()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for i, r in enumerate(results):
        c = colors[i % len(colors)]
        xs = [p["index"] for p in r["prompts"]]
        unit = 2**30 if max(p["peak_memory"] for q in results for p in q["prompts"]) >= 2**30 else 2**20
        (h1,) = ax_mem.plot(xs, [p["peak_memory"] / unit for p in r["prompts"]], "-o", color=c,
                            label=f"{r['mode']} memory")
        (h2,) = ax_time.plot(xs, [p["gen_s"] for p in r["prompts"]], "--s", color=c, alpha=0.8,
                             label=f"{r['mode']} time")
        handles += [h1, h2]
    ax_mem.set_xlabel("prompt")
    ax_mem.set_xticks([p["index"] for p in results[0]["prompts"]])
    ax_mem.set_ylabel(f"peak memory ({'GiB' if unit == 2**30 else 'MiB'}, solid)")
    ax_time.set_ylabel(f"generation time (s, dashed; {results[0]['prompts'][0]['new_tokens']} new tokens)")
    ax_mem.set_ylim(bottom=0)
    ax_time.set_ylim(bottom=0)
    ax_mem.grid(alpha=0.3)
    ax_mem.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(4, len(handles)),
                  fontsize=8)
    ax_mem.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_bench(args: argparse.Namespace) -> int:
    from .quant.swap import MODES

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in (*FLOAT_MODES, *MODES)]
    if bad or not modes:
        raise ValueError(f"unknown modes {bad}; choose from {', '.join((*FLOAT_MODES, *MODES))}")
    prompts = _read_prompts(args.prompts)
    model = getattr(args, "model_pos", None) or args.model
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in modes:
        spec = dict(model=model, mode=mode, prompts=prompts, runs=args.runs, max_new_tokens=args.max_new_tokens,
                    device=args.device, dtype=args.dtype, threads=args.threads, revision=args.revision,
                    ignore_eos=not args.stop_at_eos)
        r = measure_mode(**spec) if args.in_process else _run_subprocess(spec)
        results.append(r)
        print(f"[{mode}] load {r['load_s']:.2f}s, peak {_fmt_mem(r['peak_memory'])}, "
              f"{_mean(p['tokens_per_s'] for p in r['prompts']):.2f} tok/s", file=sys.stderr, flush=True)
    name = str(model) if model else "bundled tiny-falcon-shakespeare"
    meta = {"model": name, "modes": modes, "runs": args.runs, "max_new_tokens": args.max_new_tokens,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "command": " ".join(["gyrfalcon", *sys.argv[1:]])}
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n",
                                        encoding="utf-8")
    write_csv(results, out_dir / "bench.csv")
    title = (f"gyrfalcon bench: {Path(name).name} on {results[0]['device']}, {args.max_new_tokens} new tokens, "
             f"threads {results[0]['threads']}")
    drew = plot(results, out_dir / "bench.png", title)
    print(table(results))
    print(f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.csv'}"
          + (f", {out_dir / 'bench.png'}" if drew else " (no PNG: pip install matplotlib)"))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
    else:
        from .cli import main

        sys.exit(main(["bench", *sys.argv[1:]]))
