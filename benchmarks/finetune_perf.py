"""Fine-tuning performance: gyrfalcon's LoRA/QLoRA against peft + transformers, and a demonstration on OASST.

    python benchmarks/finetune_perf.py compare [--layers 16 --hidden 1024 --batch 4 --seq 512 --steps 3]
    python benchmarks/finetune_perf.py demo [--steps 100]
    python benchmarks/finetune_perf.py all --json out.json

compare: the same random multi-query Falcon (7B layout, hidden 1024, 16 layers, head_dim 64, vocab 65024, tied
embeddings: ~250M parameters), the same LoRA (r=16, alpha=32, dropout 0.05 on query_key_value, dense,
dense_h_to_4h, dense_4h_to_h), the same batch of random tokens (4 x 512), fp32, AdamW, with and without gradient
checkpointing. Ours is `gyrfalcon.train.loop.train` over `PackedCausalLM` (what `gyrfalcon finetune` runs); theirs
is a plain loop over `peft.get_peft_model(transformers.FalconForCausalLM)` (loss from `labels=`, sdpa attention;
with checkpointing, `gradient_checkpointing_enable(use_reentrant=False)`). Each measurement runs in its own
subprocess, so its peak RSS (ru_maxrss, the whole process: model, optimizer, activations) is its own. One step
warms up, then `--steps` steps are timed; tokens/s counts every input token (batch x seq per step), on both sides.

demo: the bundled tiny Falcon fine-tuned on the 100 OASST trees (best-ranked reply path per tree, 10% of trees
held out) with LoRA and with QLoRA (nf4 base) through `gyrfalcon finetune`: held-out loss before/after, tokens/s
(input tokens, and assistant target tokens), peak RSS, adapter size, and a greedy answer to a held-out prompt
before and after. Each run is a subprocess.

Run it alone (`flock /tmp/gf-bench.lock python benchmarks/finetune_perf.py all`): timings are wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OASST = REPO.parent / "shared" / "data" / "finetune" / "oasst_en_100_trees" / "en_100_tree.jsonl"
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------------------------
# workers (one per subprocess)


def _batches(vocab: int, batch: int, seq: int, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def worker_ours(a: argparse.Namespace) -> dict:
    import torch

    from gyrfalcon.config import FalconConfig
    from gyrfalcon.finetune.loop import PackedCausalLM, prepare_for_training, sft_loss
    from gyrfalcon.finetune.lora import LoraConfig, apply_lora
    from gyrfalcon.models import build_model
    from gyrfalcon.train.loop import TrainConfig, train

    torch.set_num_threads(a.threads)
    cfg = FalconConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.hidden // 64,
                       num_kv_heads=1, ffn_hidden_size=4 * a.hidden, layer_norm_epsilon=1e-5,
                       new_decoder_architecture=False, parallel_attn=True, num_ln=1, bias=False, alibi=False,
                       rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=11,
                       eos_token_id=11)
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    apply_lora(model, LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=tuple(TARGETS)))
    prepare_for_training(model)  # as `gyrfalcon finetune` does
    wrapped = PackedCausalLM(model)
    pos = torch.arange(a.seq).expand(a.batch, a.seq)
    seg = torch.zeros(a.batch, a.seq, dtype=torch.long)
    data = [{"input_ids": b, "targets": torch.cat([b[:, 1:], torch.full((a.batch, 1), -100)], 1),
             "positions": pos, "segments": seg} for b in _batches(a.vocab, a.batch, a.seq, a.steps + 1)]
    times, cpu = [], []

    def on_step(step, record):
        times.append(time.perf_counter())
        cpu.append(time.process_time())

    rss_ready = peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    train(wrapped, iter(data), sft_loss, TrainConfig(steps=a.steps + 1, lr=1e-4, warmup=0, weight_decay=0.0,
                                                     gradient_checkpointing=a.ckpt, progress=False),
          on_step=on_step)
    step_s = [b - a_ for a_, b in zip([t0, *times[:-1]], times, strict=True)]
    cpu_s = [b - a_ for a_, b in zip([c0, *cpu[:-1]], cpu, strict=True)]
    return _result("gyrfalcon", a, step_s, cpu_s, rss_ready)


def _result(impl: str, a: argparse.Namespace, step_s: list[float], cpu_s: list[float], rss_ready: float) -> dict:
    """Wall-clock tokens/s over the timed steps, and tokens per CPU-second (all threads' CPU time: steadier than
    wall clock when other jobs share the cores)."""
    n = a.batch * a.seq * (len(step_s) - 1)
    return {"impl": impl, "ckpt": a.ckpt, "threads": a.threads, "step_s": step_s, "cpu_s": cpu_s,
            "tokens_per_s": n / sum(step_s[1:]), "tokens_per_cpu_s": n / sum(cpu_s[1:]),
            "peak_rss_mb": peak_rss_mb(), "rss_before_training_mb": rss_ready}


def worker_peft(a: argparse.Namespace) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(a.threads)
    config = transformers.FalconConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                                       num_attention_heads=a.hidden // 64, multi_query=True, parallel_attn=True,
                                       bias=False, alibi=False, new_decoder_architecture=False,
                                       bos_token_id=11, eos_token_id=11)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(config)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    if a.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    rss_ready = peak_rss_mb()
    step_s, cpu_s = [], []
    for b in _batches(a.vocab, a.batch, a.seq, a.steps + 1):
        t, c = time.perf_counter(), time.process_time()
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t)
        cpu_s.append(time.process_time() - c)
    return _result("peft", a, step_s, cpu_s, rss_ready)


def worker_demo(a: argparse.Namespace) -> dict:
    """One `gyrfalcon finetune` run on OASST (in this process, for its peak RSS), then sample answers."""
    import torch

    import gyrfalcon
    from gyrfalcon.cli import main
    from gyrfalcon.finetune.data import load_records, split_records

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    argv = ["finetune", "--data", str(OASST), "--out", str(out), "--steps", str(a.steps), "--batch-size", "4",
            "--seq-len", "256", "--lr", "1e-3", "--warmup", str(max(1, a.steps // 10)), "--lora-r", "16",
            "--lora-alpha", "32", "--lora-dropout", "0.05", "--eval-every", "0", "--save-every", "0",
            "--no-progress", "--threads", str(a.threads), "--seed", "0"]
    if a.quantize:
        argv += ["--quantize", a.quantize]
    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    peak = peak_rss_mb()
    summary = json.loads((out / "finetune.json").read_text())
    _, held = split_records(load_records(OASST), 0.1, 0)
    prompt_msgs = [m for m in held[0].messages[:1]]
    before = gyrfalcon.load(device="cpu", quantize=a.quantize)
    after = gyrfalcon.load(device="cpu", quantize=a.quantize, adapter=str(out))
    prompt = before.tokenizer.apply_chat_template(prompt_msgs, add_generation_prompt=True)
    answers = {}
    for name, llm in (("before", before), ("after", after)):
        res = llm.generate(prompt, max_new_tokens=48, temperature=0.0, stop=["\nUser:"])
        first = res[0] if isinstance(res, list) else res
        answers[name] = getattr(first, "text", str(first))
    rows = a.steps * 4
    return {"impl": "gyrfalcon finetune", "quantize": a.quantize, "rc": rc, "steps": a.steps,
            "eval_loss_before": summary["eval_loss_before"], "eval_loss_after": summary["eval_loss"],
            "train_seconds": summary["seconds"], "wall_s": wall,
            "input_tokens_per_s": rows * 256 / summary["seconds"],
            "target_tokens_per_s": summary["tokens"] / summary["seconds"], "peak_rss_mb": peak,
            "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
            "prompt": prompt_msgs[0]["content"], "answer_before": answers["before"], "answer_after": answers["after"]}


# ---------------------------------------------------------------------------------------------------------------
# driver


def _spawn(args: list[str], timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(a: argparse.Namespace) -> list[dict]:
    shape = ["--layers", str(a.layers), "--hidden", str(a.hidden), "--vocab", str(a.vocab), "--batch",
             str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--threads", str(a.threads)]
    results = []
    for ckpt in (False, True):
        pair = {}
        for impl in ("peft", "ours"):
            r = _spawn(["worker", impl, *shape, *(["--ckpt"] if ckpt else [])], a.timeout)
            pair[impl] = r
            print(f"  {impl:5s} ckpt={ckpt!s:5s}: {r['tokens_per_s']:7.1f} tokens/s "
                  f"({r['tokens_per_cpu_s']:.1f} per CPU-second), peak RSS {r['peak_rss_mb'] / 1024:.2f} GiB, "
                  f"step wall s {[round(s, 1) for s in r['step_s']]}, CPU s {[round(s, 1) for s in r['cpu_s']]}",
                  flush=True)
        ratio = pair["ours"]["tokens_per_s"] / pair["peft"]["tokens_per_s"]
        cpu_ratio = pair["ours"]["tokens_per_cpu_s"] / pair["peft"]["tokens_per_cpu_s"]
        mem = pair["ours"]["peak_rss_mb"] / pair["peft"]["peak_rss_mb"]
        print(f"  gradient checkpointing {'on ' if ckpt else 'off'}: ours/peft tokens/s = {ratio:.2f}x "
              f"(per CPU-second {cpu_ratio:.2f}x), peak RSS ours/peft = {mem:.2f}", flush=True)
        results.append({"ckpt": ckpt, "ours": pair["ours"], "peft": pair["peft"], "speed_ratio": ratio,
                        "cpu_speed_ratio": cpu_ratio, "rss_ratio": mem})
    return results


def demo(a: argparse.Namespace) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="gf-ftbench-") as tmp:
        for quantize in (None, "nf4"):
            out = Path(tmp) / (quantize or "lora")
            r = _spawn(["worker", "demo", "--out", str(out), "--steps", str(a.demo_steps), "--threads",
                        str(a.threads), *(["--quantize", quantize] if quantize else [])], a.timeout)
            name = "QLoRA (nf4)" if quantize else "LoRA (fp32)"
            print(f"  {name}: held-out loss {r['eval_loss_before']:.3f} -> {r['eval_loss_after']:.3f} "
                  f"({r['steps']} steps), {r['input_tokens_per_s']:.0f} input tokens/s "
                  f"({r['target_tokens_per_s']:.0f} assistant tokens/s), peak RSS {r['peak_rss_mb']:.0f} MiB, "
                  f"adapter {r['adapter_bytes'] / 2**20:.2f} MiB", flush=True)
            print(f"    prompt: {r['prompt'][:100]!r}\n    before: {r['answer_before'][:160]!r}\n"
                  f"    after:  {r['answer_after'][:160]!r}", flush=True)
            results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["compare", "demo", "all", "worker"])
    p.add_argument("impl", nargs="?", choices=["ours", "peft", "demo"])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=65024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--demo-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--ckpt", action="store_true")
    p.add_argument("--quantize")
    p.add_argument("--out")
    p.add_argument("--json", help="write all results here")
    a = p.parse_args(argv)
    if a.what == "worker":
        fn = {"ours": worker_ours, "peft": worker_peft, "demo": worker_demo}[a.impl]
        print(json.dumps(fn(a)))
        return 0
    results: dict = {"threads": a.threads}
    if a.what in ("compare", "all"):
        print(f"LoRA training, random Falcon {a.layers} layers x {a.hidden} (vocab {a.vocab}), batch {a.batch} x "
              f"{a.seq}, fp32, {a.threads} threads, {a.steps} timed steps:", flush=True)
        results["compare"] = compare(a)
    if a.what in ("demo", "all"):
        print(f"bundled tiny Falcon on OASST (100 trees), {a.demo_steps} steps, batch 4 x 256:", flush=True)
        results["demo"] = demo(a)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
