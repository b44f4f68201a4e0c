"""Load benchmark of `gyrfalcon serve`: N concurrent streaming clients against the same requests one at a time.

    python benchmarks/serve_load.py                               # the bundled model
    python benchmarks/serve_load.py --model path/to/model_dir
    python benchmarks/serve_load.py --random 250m                 # a random ~250M Falcon (7B layout)
    python benchmarks/serve_load.py --random 250m --json out.json --server-arg=--max-batch-tokens=256

It starts `gyrfalcon serve` in a subprocess on 127.0.0.1, builds a fixed workload (seeded: prompts cut from the
Tiny Shakespeare corpus with mixed lengths, 64-128 new tokens each, `ignore_eos` so every request generates
exactly what it asked for) and sends it over OpenAI's streaming /v1/completions:

* sequential: the requests one at a time (one client);
* concurrent: `--clients` clients pulling from the same list of requests, `--rounds` times over; the server's
  resident memory is read after each round (flat across rounds = no leak).

Reported: throughput (generated tokens/s over the wall time of the pass), time to first token (send -> first
token event) and inter-token latency (gap between consecutive token events of a request), p50/p99, errors
(non-200, broken streams, wrong token counts), the ratio concurrent/sequential and the server's RSS per round.
Targets (issue 5): ratio >= 5, 0 errors, RSS flat across rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CORPUS = SHARED / "corpus" / "tinyshakespeare" / "input.txt"
TOKENIZER = SHARED / "falcon_tokenizer"
SIZES = {"250m": (1024, 16), "tiny": (256, 2)}  # hidden, layers; head_dim 64, multi-query, vocab 65024


@dataclass
class Result:
    ok: bool
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    error: str = ""


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def random_falcon(size: str, out: Path) -> Path:
    """A random multi-query Falcon of `size` with the real Falcon tokenizer, saved as an HF model dir."""
    import torch
    from safetensors.torch import save_file

    from gyrfalcon.config import from_hf
    from gyrfalcon.models import build_model

    hidden, layers = SIZES[size]
    raw = dict(model_type="falcon", architectures=["FalconForCausalLM"], vocab_size=65024, hidden_size=hidden,
               num_hidden_layers=layers, num_attention_heads=hidden // 64, multi_query=True, parallel_attn=True,
               new_decoder_architecture=False, bias=False, alibi=False, tie_word_embeddings=True,
               max_position_embeddings=2048, bos_token_id=11, eos_token_id=11)
    torch.manual_seed(0)
    model = build_model(from_hf(raw), device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            else:
                p.normal_(0, 0.02)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    for f in TOKENIZER.glob("*.json"):
        shutil.copy(f, out)
    return out


def workload(n: int, seed: int, min_new: int, max_new: int, temperature: float, top_p: float) -> list[dict]:
    """n requests: prompts of mixed lengths (~8 to ~400 tokens) cut from the corpus, min_new..max_new tokens."""
    rng = random.Random(seed)
    text = CORPUS.read_text() if CORPUS.is_file() else "To be, or not to be, that is the question. " * 4000
    reqs = []
    for i in range(n):
        chars = rng.choice([30, 120, 400, 1200, 1600])
        start = rng.randrange(0, len(text) - chars)
        reqs.append({"prompt": text[start : start + chars], "max_tokens": rng.randint(min_new, max_new),
                     "temperature": temperature, "top_p": top_p, "seed": seed + i, "ignore_eos": True, "stream": True,
                     "stream_options": {"include_usage": True}})
    return reqs


def fit_to_context(url: str, reqs: list[dict], margin: int = 8) -> int:
    """Cut the start of prompts that would not fit the served model's context with their max_tokens (the bundled
    model has 256 positions), at a token boundary found with the server's /tokenize; returns how many were cut."""
    import httpx

    ctx = httpx.get(f"{url}/info", timeout=30).json().get("max_total_tokens")
    if not ctx:
        return 0
    cut = 0
    for r in reqs:
        toks = httpx.post(f"{url}/tokenize", json={"inputs": r["prompt"]}, timeout=30).json()
        keep = ctx - r["max_tokens"] - margin
        if len(toks) > keep:
            r["prompt"] = r["prompt"][toks[len(toks) - keep]["start"] :]
            cut += 1
    return cut


async def one_request(client, body: dict) -> Result:
    t0 = time.perf_counter()
    last = None
    res = Result(ok=False)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                ev = json.loads(data)
                if "error" in ev:
                    res.error = str(ev["error"])
                    return res
                if ev.get("usage"):
                    res.tokens = ev["usage"]["completion_tokens"]
                if ev.get("choices"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.gaps.append(now - last)
                    last = now
            if not done:
                res.error = "stream ended without [DONE]"
            elif res.tokens != body["max_tokens"]:
                res.error = f"{res.tokens} tokens, asked for {body['max_tokens']}"
            else:
                res.ok = True
    except Exception as e:  # a broken connection, a timeout: an error, counted
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_pass(url: str, reqs: list[dict], clients: int) -> tuple[list[Result], float]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one_request(client, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall


def summarize(name: str, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    errors = [r.error for r in results if not r.ok]
    return {"pass": name, "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
            "generated_tokens": tokens, "wall_s": round(wall, 2), "throughput_tok_s": round(tokens / wall, 2),
            "ttft_p50_s": round(percentile(ttft, 0.5), 4), "ttft_p99_s": round(percentile(ttft, 0.99), 4),
            "itl_p50_s": round(percentile(gaps, 0.5), 4), "itl_p99_s": round(percentile(gaps, 0.99), 4)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int, extra: list[str], log_path: Path) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "gyrfalcon.cli", "serve"] + ([model] if model else []) + [
        "--port", str(port), "--log-level", "warning"] + extra
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}):\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up in 10 minutes")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="model dir or hub id (default: the bundled model)")
    src.add_argument("--random", choices=sorted(SIZES), help="a random Falcon of this size")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="concurrent rounds (memory is read after each)")
    ap.add_argument("--sequential-requests", type=int, default=None,
                    help="send only the first N requests in the sequential pass (default: all); its throughput is "
                         "a rate, so a prefix measures it on a slow machine")
    ap.add_argument("--min-new", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `gyrfalcon serve` argument (repeatable)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import psutil

    tmp = Path(tempfile.mkdtemp(prefix="gf-serve-load-"))
    try:
        model = args.model
        if args.random:
            print(f"building a random {args.random} Falcon in {tmp} ...", file=sys.stderr)
            model = str(random_falcon(args.random, tmp / f"falcon-{args.random}"))
        port = free_port()
        extra = ["--max-batch-size", str(max(args.clients, 16))] + args.server_arg
        proc = start_server(model, port, extra, tmp / "server.log")
        url = f"http://127.0.0.1:{port}"
        server = psutil.Process(proc.pid)
        reqs = workload(args.requests, args.seed, args.min_new, args.max_new, args.temperature, args.top_p)
        cut = fit_to_context(url, reqs)
        if cut:
            print(f"{cut} prompts cut at the start to fit the model's context", file=sys.stderr)
        try:
            asyncio.run(run_pass(url, reqs[:2], 2))  # warm-up (first-call costs), not measured
            seq_reqs = reqs[: args.sequential_requests] if args.sequential_requests else reqs
            print(f"sequential: {len(seq_reqs)} requests one at a time ...", file=sys.stderr)
            seq = summarize("sequential", *asyncio.run(run_pass(url, seq_reqs, 1)))
            rounds, rss = [], []
            for k in range(args.rounds):
                print(f"concurrent round {k + 1}/{args.rounds}: {args.requests} requests, {args.clients} clients",
                      file=sys.stderr)
                rounds.append(summarize(f"concurrent-{k + 1}", *asyncio.run(run_pass(url, reqs, args.clients))))
                time.sleep(1.0)  # let the engine thread finish its last step and go idle before reading RSS
                rss.append(server.memory_info().rss)
        finally:
            proc.terminate()
            proc.wait(60)
        best = max(rounds, key=lambda r: r["throughput_tok_s"])
        ratio = best["throughput_tok_s"] / seq["throughput_tok_s"]
        growth = (rss[-1] - rss[0]) / rss[0] if len(rss) > 1 else 0.0
        report = {
            "model": model or "bundled", "clients": args.clients, "requests": args.requests,
            "new_tokens": [args.min_new, args.max_new], "sampling": {"temperature": args.temperature,
                                                                      "top_p": args.top_p},
            "server_args": extra, "cpu_count": os.cpu_count(), "prompts_cut_to_context": cut,
            "sequential": seq, "concurrent": rounds, "speedup": round(ratio, 2),
            "server_rss_mib_per_round": [round(r / 2**20, 1) for r in rss], "rss_growth_first_to_last": growth,
            "targets": {"speedup>=5": ratio >= 5, "zero_errors": seq["errors"] + sum(r["errors"] for r in rounds) == 0,
                        "memory_flat(<5%)": abs(growth) < 0.05},
        }
        cols = ["pass", "requests", "errors", "generated_tokens", "wall_s", "throughput_tok_s", "ttft_p50_s",
                "ttft_p99_s", "itl_p50_s", "itl_p99_s"]
        print(" | ".join(cols))
        for row in [seq, *rounds]:
            print(" | ".join(str(row[c]) for c in cols))
        print(f"speedup (best concurrent / sequential): {ratio:.2f}x; server RSS per round (MiB): "
              f"{report['server_rss_mib_per_round']}; targets: {report['targets']}")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return 0 if all(report["targets"].values()) else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
