"""Evaluation speed: gyrfalcon's scorer against lm-evaluation-harness's HFLM on the same requests, same run.

    python benchmarks/eval_speed.py              # 200 items each: ARC-c 25-shot, HellaSwag 10-shot, MMLU 5-shot
    python benchmarks/eval_speed.py --items 20 --json out.json
    python benchmarks/eval_speed.py --skip-hflm  # ours only (tuning)

A ~250M random Falcon (7B layout: multi-query, hidden 1024, 16 layers, head_dim 64, vocab 65024, tied
embeddings; transformers' own init) is saved once as an HF directory with the real Falcon tokenizer. The requests are
built by gyrfalcon's task modules from the evaluation data (the prompts are lm-eval's, see tests/test_eval_lm_eval.py):
the first N items of ARC-Challenge, HellaSwag and MMLU (MMLU in lm-eval's order: subject by subject, so 200 items
are abstract_algebra's 100 and anatomy's first 100; a full run has 246 items per subject on average, so a subject's
shared 5-shot prefix serves more items there than here). `--mmlu-spread` instead takes ceil(N / 50) items from
each of the first subjects, the least favourable case for prefix sharing.

Both sides score the identical (context, continuation) string pairs: HFLM through `loglikelihood` (its own
tokenization, sorting, batching and one-token-continuation cache; `--hf-batch-size`), gyrfalcon through
`Scorer.loglikelihood` (`--batch-size`). Reported per task: requests, the context + continuation tokens HFLM
feeds its model, seconds for each, the ratio, and the task accuracies computed from each side's numbers (they must be
identical), with the largest loglikelihood difference. Everything is fp32 on CPU, `--threads` threads, under
torch.inference_mode; each side is timed once, after one tiny warm-up request.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT.parent / "shared" / "data" / "falcon_tokenizer"


def build_model_dir(out: Path, hidden: int, layers: int) -> Path:
    import torch
    import transformers

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = transformers.FalconConfig(
        vocab_size=65024, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False,
        tie_word_embeddings=True, max_position_embeddings=2048, bos_token_id=11, eos_token_id=11)
    torch.manual_seed(0)
    transformers.FalconForCausalLM(config).save_pretrained(out)
    for f in TOKENIZER_DIR.glob("*.json"):
        shutil.copy(f, out)
    return out


def build_requests(items: int, tasks: list[str], data_dir: str | None, mmlu_spread: bool = False):
    """task -> (task object, docs, pairs, groups)."""
    from gyrfalcon.eval.data import find_data_dir
    from gyrfalcon.eval.tasks import get_task
    from gyrfalcon.eval.tasks.base import DEFAULT_SEED
    from gyrfalcon.eval.tasks.mmlu import SUBJECTS, MMLUTask

    data = find_data_dir(data_dir)
    out = {}
    for name in tasks:
        if name == "mmlu" and mmlu_spread:
            per = math.ceil(items / 50)
            task = MMLUTask(list(SUBJECTS)[: math.ceil(items / per)])
            docs = task.docs(data, 5, per, DEFAULT_SEED)[:items]
        else:
            task = get_task(name)
            docs = task.docs(data, task.default_fewshot, items, DEFAULT_SEED)[:items]
        pairs = [p for d in docs for p in d.requests]
        groups = [d.group for d in docs for _ in d.requests]
        out[name] = (task, docs, pairs, groups)
    return out, data


def accuracies(task, docs, results) -> dict[str, float]:
    scores, at = [], 0
    for d in docs:
        scores.append(task.score(d, results[at : at + len(d.requests)]))
        at += len(d.requests)
    return {m.name: m.value for m in task.aggregate(docs, scores).metrics}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200, help="items per task (default 200)")
    ap.add_argument("--tasks", default="arc_challenge,hellaswag,mmlu")
    ap.add_argument("--batch-size", type=int, default=16, help="gyrfalcon contexts per forward")
    ap.add_argument("--hf-batch-size", type=int, default=8, help="HFLM batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--model-dir", help="where to keep the random model (default: a temporary folder)")
    ap.add_argument("--data-dir", help="evaluation data (default: as gyrfalcon eval)")
    ap.add_argument("--mmlu-spread", action="store_true", help="MMLU items spread over 50 subjects")
    ap.add_argument("--skip-hflm", action="store_true", help="time gyrfalcon only")
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import gyrfalcon
    from gyrfalcon.eval.scoring import Scorer

    tmp = None
    if args.model_dir:
        model_dir = build_model_dir(Path(args.model_dir), args.hidden, args.layers)
    else:
        tmp = tempfile.mkdtemp(prefix="gf-eval-speed-")
        model_dir = build_model_dir(Path(tmp), args.hidden, args.layers)
    try:
        work, data = build_requests(args.items, args.tasks.split(","), args.data_dir, args.mmlu_spread)
        llm = gyrfalcon.load(model_dir, device="cpu", dtype="fp32")
        params = sum(p.numel() for p in llm.model.parameters())
        print(f"model: random Falcon, {params / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers), "
              f"fp32, {torch.get_num_threads()} threads; data: {data.root}", flush=True)
        scorer = Scorer.for_llm(llm, batch_size=args.batch_size)
        scorer.loglikelihood([("Hello", " world")])  # warm-up

        hflm = None
        if not args.skip_hflm:
            import transformers
            from lm_eval.api.instance import Instance
            from lm_eval.models.huggingface import HFLM

            hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            tok = transformers.AutoTokenizer.from_pretrained(model_dir)
            hflm = HFLM(pretrained=hf, tokenizer=tok, batch_size=args.hf_batch_size, device="cpu")
            hflm.loglikelihood([Instance("loglikelihood", {}, ("Hello", " world"), 0)], disable_tqdm=True)

        rows = []
        for name, (task, docs, pairs, groups) in work.items():
            encoded = scorer.requests(pairs)
            tokens = sum(len(r.context) + len(r.continuation) for r in encoded)
            t0 = time.perf_counter()
            with torch.inference_mode():
                ours = scorer.loglikelihood(pairs, groups)
            t_ours = time.perf_counter() - t0
            row = {"task": name, "items": len(docs), "requests": len(pairs), "tokens": tokens,
                   "gyrfalcon_s": t_ours, "gyrfalcon_acc": accuracies(task, docs, ours)}
            if hflm is not None:
                insts = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
                t0 = time.perf_counter()
                with torch.inference_mode():
                    theirs = hflm.loglikelihood(insts, disable_tqdm=True)
                t_hf = time.perf_counter() - t0
                row.update(hflm_s=t_hf, ratio=t_hf / t_ours, hflm_acc=accuracies(task, docs, theirs),
                           max_ll_diff=max(abs(a - b) for (a, _), (b, _) in zip(ours, theirs, strict=True)),
                           greedy_flags_equal=[g for _, g in ours] == [g for _, g in theirs])
                row["accuracies_equal"] = row["hflm_acc"] == row["gyrfalcon_acc"]
            rows.append(row)
            print(_line(row), flush=True)

        total = {"tokens": sum(r["tokens"] for r in rows), "gyrfalcon_s": sum(r["gyrfalcon_s"] for r in rows)}
        print(f"\ngyrfalcon: {total['tokens'] / total['gyrfalcon_s']:.0f} context+continuation tok/s")
        if hflm is not None:
            total["hflm_s"] = sum(r["hflm_s"] for r in rows)
            total["ratio"] = total["hflm_s"] / total["gyrfalcon_s"]
            print(f"HFLM:      {total['tokens'] / total['hflm_s']:.0f} context+continuation tok/s")
            print(f"gyrfalcon is {total['ratio']:.2f}x faster than lm-eval's HFLM in total "
                  f"({total['hflm_s']:.1f} s vs {total['gyrfalcon_s']:.1f} s); accuracies identical: "
                  f"{all(r['accuracies_equal'] for r in rows)}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "rows": rows, "total": total, "items": args.items, "batch_size": args.batch_size,
                "hf_batch_size": args.hf_batch_size, "threads": torch.get_num_threads(), "params": params,
                "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count()}, indent=2) + "\n")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _line(r: dict) -> str:
    s = (f"{r['task']:<14} items {r['items']:>4}  requests {r['requests']:>5}  tokens {r['tokens']:>8}  "
         f"gyrfalcon {r['gyrfalcon_s']:8.1f} s")
    if "hflm_s" in r:
        s += (f"  HFLM {r['hflm_s']:8.1f} s  ratio {r['ratio']:5.2f}x  acc equal {r['accuracies_equal']}  "
              f"max |dll| {r['max_ll_diff']:.1e}  greedy equal {r['greedy_flags_equal']}")
    s += "  acc " + ", ".join(f"{k} {v:.4f}" for k, v in r["gyrfalcon_acc"].items())
    return s


if __name__ == "__main__":
    sys.exit(main())
