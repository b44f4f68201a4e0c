"""Core CPU performance of gyrfalcon's Falcon against transformers, and against the memory-bandwidth roofline.

    python benchmarks/core_perf.py                          # 250m and 1.1b, all cores
    python benchmarks/core_perf.py --sizes 250m --threads 2 --json out.json

For each size a random multi-query Falcon (7B layout: 1 KV head, head_dim 64, vocab 65024, tied embeddings) is
built with transformers' own init, saved once as an HF directory (config.json + fp32 model.safetensors) in a
temporary directory, and then loaded and measured in a fresh subprocess per implementation, one after the other,
so that neither the memory peaks nor the CPU time mix:

* load: seconds until the model is ready, and its peak RSS (ru_maxrss minus the RSS after imports); we also give
  the first prefill's time, because our loader memory-maps the weights and pages them in on first use;
* prefill: tokens/s of one 128-token prompt at batch 1 (ours: `forward(ids, cache, last_only=True)`, what
  `Generation` runs; transformers: `model(ids, use_cache=True)`, logits at all 128 positions as its forward
  returns them, plus the same with `logits_to_keep=1` for reference);
* decode: tokens/s of greedy decoding, N new tokens after the prompt, at batch 1 and batch B. Ours drives
  `gyrfalcon.runtime.generate.Generation` (the loop every user path runs); transformers runs `model.generate`
  (sdpa attention, use_cache, min_new_tokens = max_new_tokens) with a streamer that timestamps every token.
  Decode time runs from the first token (end of prefill) to the last, over N - 1 steps;
* roofline: the read bandwidth is measured in this run (a large fp32 tensor sum with the same thread count, best of
  several, before the models and after each run; the roofline uses the best of all probes, and each implementation
  is also compared with the best probe just before / after its own run, as the bandwidth of a shared host drifts
  by tens of percent over minutes); a decode step must read every weight once (the tied embedding / lm_head
  once) plus the KV cache, so roofline tokens/s = bandwidth / those bytes (at the mean context length). As the
  bandwidth probe is itself only a probe, a kernel can beat it slightly; the same probe is used for both sides.

Throughput is the best of `--repeats` runs (the least disturbed by other processes). Everything is fp32 under
`torch.inference_mode`. Peak RSS is also reported after generating (load + all measurements).
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

SIZES = {
    # name: (hidden, layers); head_dim 64, multi-query, vocab 65024, tied embeddings, 4x MLP
    "250m": (1024, 16),
    "1.1b": (2048, 24),
    # not part of the default run: a quick size for trying the script out
    "tiny": (256, 2),
}
VOCAB = 65024
HEAD_DIM = 64


def hf_config_dict(size: str) -> dict:
    hidden, layers = SIZES[size]
    return dict(
        model_type="falcon", architectures=["FalconForCausalLM"], vocab_size=VOCAB, hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // HEAD_DIM, multi_query=True, parallel_attn=True,
        new_decoder_architecture=False, bias=False, alibi=False, tie_word_embeddings=True,
        max_position_embeddings=2048, bos_token_id=11, eos_token_id=11,
    )


# ---------------------------------------------------------------------------------------------------------------
# Subprocess roles


def role_make(out_dir: str, size: str) -> None:
    """Build a random transformers Falcon and save it as an fp32 HF directory."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.FalconConfig(**{k: v for k, v in hf_config_dict(size).items()
                                          if k not in ("model_type", "architectures")})
    model = transformers.FalconForCausalLM(config).eval()  # transformers' init: N(0, 0.02) linears, unit norms
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, bad
    model.save_pretrained(out_dir)  # safetensors, fp32, lm_head tied (not stored)


def _bandwidths(threads: int, gib: float = 1.0, repeats: int = 7) -> dict[str, float]:
    """Read bandwidth probes in bytes/s, best time of `repeats` each, over a tensor much larger than the caches:
    `sum` (a reduction), `mv` (a matrix-vector product with 16 KiB rows, the access pattern of decoding) and
    `copy` (read + write, both counted). The roofline uses the larger of the two pure reads."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30)) // 4)
    m = x.view(-1, 4096)
    v = torch.ones(4096)
    y = torch.empty_like(x)

    def best(fn) -> float:
        fn()
        t_best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            t_best = min(t_best, time.perf_counter() - t)
        return t_best

    nbytes = x.numel() * 4
    return {"sum": nbytes / best(x.sum), "mv": nbytes / best(lambda: torch.mv(m, v)),
            "copy": 2 * nbytes / best(lambda: y.copy_(x))}


def role_bandwidth(threads: int) -> None:
    print(json.dumps(_bandwidths(threads)))


def role_run(impl: str, model_dir: str, threads: int, prompt_len: int, new_tokens: int, batch: int,
             repeats: int, logits_out: str | None) -> None:
    import torch

    torch.set_num_threads(threads)
    if impl == "ours":
        from gyrfalcon.config import load_config
        from gyrfalcon.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
        from gyrfalcon.models import build_model
        from gyrfalcon.runtime.generate import Generation
        from gyrfalcon.runtime.sampling import SamplingParams
        from gyrfalcon.weights import load_weights
    else:
        import transformers
        from transformers.generation.streamers import BaseStreamer

        from gyrfalcon.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    gen = torch.Generator().manual_seed(1234)
    prompts = torch.randint(0, VOCAB, (batch, prompt_len), generator=gen)
    rss0 = current_rss_bytes()
    reset_ok = reset_peak_rss()

    t0 = time.perf_counter()
    if impl == "ours":
        model = build_model(load_config(model_dir))
        load_weights(model, model_dir, torch.float32, "cpu")
        model.eval()
    else:
        model = transformers.FalconForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()
    load_s = time.perf_counter() - t0
    load_peak = peak_rss_bytes() - rss0

    seen: set[int] = set()
    weight_bytes = 0
    for p in model.parameters():
        if p.untyped_storage().data_ptr() not in seen:
            seen.add(p.untyped_storage().data_ptr())
            weight_bytes += p.numel() * p.element_size()
    cfg = model.config
    layers = cfg.num_layers if impl == "ours" else cfg.num_hidden_layers
    kv_per_token = layers * 2 * 1 * HEAD_DIM * 4  # multi-query: one KV head, fp32

    ids1 = prompts[:1]
    res: dict = {"impl": impl, "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                 "torch": torch.__version__, "load_s": load_s, "load_peak_rss": load_peak,
                 "peak_reset": reset_ok, "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token}

    with torch.inference_mode():
        # Prefill. The first call also pages in memory-mapped weights; it is reported apart.
        def prefill():
            if impl == "ours":
                cache = model.new_cache(1, prompt_len + new_tokens)
                return model(ids1, cache, last_only=True)
            return model(ids1, use_cache=True).logits[:, -1]

        t = time.perf_counter()
        logits = prefill()
        res["first_prefill_s"] = time.perf_counter() - t
        if logits_out:
            torch.save(logits.float().clone(), logits_out)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            prefill()
            best = min(best, time.perf_counter() - t)
        res["prefill_tok_s"] = prompt_len / best
        if impl != "ours":
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                model(ids1, use_cache=True, logits_to_keep=1)
                best = min(best, time.perf_counter() - t)
            res["prefill_last_only_tok_s"] = prompt_len / best

        # Decode: timestamps of every token, first (end of prefill) to last.
        def decode(rows: torch.Tensor) -> list[float]:
            if impl == "ours":
                g = Generation(model, rows.tolist(), SamplingParams(max_new_tokens=new_tokens, temperature=0.0,
                                                                     ignore_eos=True))
                stamps = []
                for _ in g:
                    stamps.append(time.perf_counter())
                assert all(len(s.tokens) == new_tokens for s in g.sequences)
                return stamps

            class Stamp(BaseStreamer):
                def __init__(self):
                    self.stamps, self.calls = [], 0

                def put(self, value):
                    self.calls += 1
                    if self.calls > 1:  # the first put is the prompt
                        self.stamps.append(time.perf_counter())

                def end(self):
                    pass

            s = Stamp()
            out = model.generate(rows, attention_mask=torch.ones_like(rows), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=s)
            assert out.shape[1] == rows.shape[1] + new_tokens
            return s.stamps

        for b in sorted({1, batch}):
            best = float("inf")
            for _ in range(repeats):
                stamps = decode(prompts[:b])
                assert len(stamps) == new_tokens, len(stamps)
                best = min(best, stamps[-1] - stamps[0])
            res[f"decode_b{b}_tok_s"] = b * (new_tokens - 1) / best

    res["gen_peak_rss"] = peak_rss_bytes() - rss0
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------------------------------
# Driver


def _sub(args: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"subprocess {args[:2]} failed with exit status {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _fmt_bytes(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _table(results: dict, prompt_len: int, batch: int) -> str:
    rows = []
    header = ["metric", "size", "gyrfalcon", "transformers", "ours/tf"]
    for size, r in results.items():
        o, h = r["ours"], r["transformers"]
        w = o["weight_bytes"]

        def row(name, a, b, fmt, better_low=False, size=size):
            ratio = (b / a if better_low else a / b) if a and b else float("nan")
            rows.append([name, size, fmt(a), fmt(b), f"{ratio:.2f}x"])

        def rss(v, w=w):
            return f"{_fmt_bytes(v)} ({v / w:.2f}x w)"

        row("load time (s)", o["load_s"], h["load_s"], lambda v: f"{v:.2f}", better_low=True)
        row("load + first prefill (s)", o["load_s"] + o["first_prefill_s"], h["load_s"] + h["first_prefill_s"],
            lambda v: f"{v:.2f}", better_low=True)
        row("peak RSS, load", o["load_peak_rss"], h["load_peak_rss"], rss, better_low=True)
        row("peak RSS, load+generate", o["gen_peak_rss"], h["gen_peak_rss"], rss, better_low=True)
        row(f"prefill tok/s ({prompt_len} tok, b1)", o["prefill_tok_s"], h["prefill_tok_s"], lambda v: f"{v:.1f}")
        rows.append(["  tf prefill, logits_to_keep=1", size, "", f"{h['prefill_last_only_tok_s']:.1f}",
                     f"{o['prefill_tok_s'] / h['prefill_last_only_tok_s']:.2f}x"])
        row("decode tok/s, b1", o["decode_b1_tok_s"], h["decode_b1_tok_s"], lambda v: f"{v:.2f}")
        bkey = f"decode_b{batch}_tok_s"
        row(f"decode tok/s, {bkey[7:-6]}", o[bkey], h[bkey], lambda v: f"{v:.2f}")
        rows.append([f"  {bkey[7:-6]} / b1 throughput", size, f"{o[bkey] / o['decode_b1_tok_s']:.2f}x",
                     f"{h[bkey] / h['decode_b1_tok_s']:.2f}x", ""])
        roof = r["roofline_tok_s"]
        rows.append(["  b1 roofline tok/s", size, f"{roof:.2f}", f"{roof:.2f}",
                     f"({_fmt_bytes(r['bytes_per_token'])}/token)"])
        rows.append(["  b1 decode % of roofline", size, f"{100 * o['decode_b1_tok_s'] / roof:.1f}%",
                     f"{100 * h['decode_b1_tok_s'] / roof:.1f}%", ""])
        if "decode_b1_pct_local_roofline" in o:
            rows.append(["  ... of the bandwidth probed around it", size, f"{o['decode_b1_pct_local_roofline']:.1f}%",
                         f"{h['decode_b1_pct_local_roofline']:.1f}%", ""])
        if "logits_max_abs_diff" in r:
            rows.append(["  last-token logits max |diff|", size, f"{r['logits_max_abs_diff']:.2e}", "", ""])
    widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(wd) for c, wd in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * wd for wd in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="250m,1.1b", help=f"comma-separated, of {sorted(SIZES)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--json", help="write all numbers to this JSON file")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="the larger decode batch (batch 1 is always measured)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--impls", default="ours,transformers", help=argparse.SUPPRESS)
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--logits-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.role == "make":
        return role_make(args.dir, args.size)
    if args.role == "bandwidth":
        return role_bandwidth(args.threads)
    if args.role in ("ours", "transformers"):
        return role_run(args.role, args.dir, args.threads, args.prompt_len, args.new_tokens, args.batch,
                        args.repeats, args.logits_out)

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        ap.error(f"unknown sizes {unknown}; choose from {sorted(SIZES)}")
    impls = args.impls.split(",")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    common = ["--threads", str(args.threads), "--prompt-len", str(args.prompt_len), "--new-tokens",
              str(args.new_tokens), "--batch", str(args.batch), "--repeats", str(args.repeats)]
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = float("nan")

    started = time.time()
    probes = [_sub(["--role", "bandwidth", "--threads", str(args.threads)], env)]
    print(f"read bandwidth ({args.threads} threads): {_fmt_probe(probes[0])}", flush=True)
    results: dict = {}
    for size in sizes:
        tmp = tempfile.mkdtemp(prefix=f"gf-core-perf-{size}-")
        try:
            t = time.perf_counter()
            _sub(["--role", "make", "--dir", tmp, "--size", size], env)
            print(f"[{size}] built and saved in {time.perf_counter() - t:.1f}s", flush=True)
            r: dict = {}
            for impl in impls:
                logits = os.path.join(tmp, f"logits-{impl}.pt")
                r[impl] = _sub(["--role", impl, "--dir", tmp, "--logits-out", logits, *common], env)
                # This machine's bandwidth drifts over minutes (shared host): probe right after each run too, so
                # each implementation is also compared with the bandwidth of its own moment (see below).
                probes.append(_sub(["--role", "bandwidth", "--threads", str(args.threads)], env))
                r[impl]["bandwidth_around"] = max(max(p["sum"], p["mv"]) for p in probes[-2:])
                print(f"[{size}] {impl}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in r[impl].items()), flush=True)
            if len(impls) == 2:
                import torch

                a, b = (torch.load(os.path.join(tmp, f"logits-{i}.pt")) for i in impls)
                r["logits_max_abs_diff"] = (a - b).abs().max().item()
            results[size] = r
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"read bandwidth ({args.threads} threads): {_fmt_probe(probes[-1])}", flush=True)
    bandwidth = max(max(p["sum"], p["mv"]) for p in probes)
    for r in results.values():
        first = r[impls[0]]
        ctx = args.prompt_len + (args.new_tokens - 1) / 2  # mean keys per decode step
        r["bytes_per_token"] = first["weight_bytes"] + first["kv_bytes_per_token"] * ctx
        r["roofline_tok_s"] = bandwidth / r["bytes_per_token"]
        for impl in impls:
            r[impl]["decode_b1_pct_roofline"] = 100 * r[impl]["decode_b1_tok_s"] / r["roofline_tok_s"]
            local = r[impl]["bandwidth_around"] / r["bytes_per_token"]
            r[impl]["decode_b1_pct_local_roofline"] = 100 * r[impl]["decode_b1_tok_s"] / local

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.machine(),
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "torch_threads": results[sizes[0]][impls[0]]["threads"] if sizes else None,
        "python": platform.python_version(), "bandwidth_probes": probes, "bandwidth": bandwidth,
        "loadavg_1m_at_start": load1, "loadavg_1m_at_end": os.getloadavg()[0], "wall_s": time.time() - started,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": args.batch, "repeats": args.repeats,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    try:
        import torch
        import transformers

        meta["torch"], meta["transformers"] = torch.__version__, transformers.__version__
    except ImportError:
        pass
    print()
    print(f"{meta['date']}  {meta['cpu']}  {meta['cpu_count']} cores, torch threads {meta['torch_threads']}, "
          f"torch {meta.get('torch')}, transformers {meta.get('transformers')}")
    print(f"roofline read bandwidth {bandwidth / 1e9:.2f} GB/s (best sum / mv probe of all rounds, "
          f"{args.threads} threads); load avg (1m) {load1:.2f} at start, {meta['loadavg_1m_at_end']:.2f} at end")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; best of {args.repeats}")
    if len(impls) == 2:
        print(_table(results, args.prompt_len, args.batch))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


def _fmt_probe(p: dict) -> str:
    return ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in p.items())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


if __name__ == "__main__":
    main()
