"""`gyrfalcon eval MODEL --tasks ...`: arguments and the run function (the table in gyrfalcon/cli.py points here)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .runner import DEFAULT_BATCH_SIZE, model_description
from .tasks import DEFAULT_SEED, task_names


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import _model_args

    _model_args(p, positional=True)
    p.add_argument("--tasks", "-t", required=True,
                   help=f"comma-separated: {', '.join(task_names())}, or mmlu_<subject>")
    p.add_argument("--limit", type=int, help="score the first N items of each task (of each MMLU subject)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples for every task (default: each task's own)")
    p.add_argument("--batch-size", "-b", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"contexts per forward pass (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"few-shot sampling seed (default {DEFAULT_SEED})")
    p.add_argument("--out", "-o", help="write the results and the exact configuration to this JSON file")
    p.add_argument("--data-dir", help="evaluation data folder laid out like shared/data/eval "
                                      "(default: $GYRFALCON_EVAL_DATA, a checkout's shared data, the bundled sample)")
    p.add_argument("--ppl-file", help="text file for the perplexity task (default: a bundled Shakespeare excerpt)")
    p.add_argument("--ppl-window", type=int, help="perplexity window in tokens (default: the model's context)")
    p.add_argument("--ppl-stride", type=int, help="perplexity stride in tokens (default: half the window)")
    p.add_argument("--subjects", action="store_true", help="also print MMLU's per-subject accuracies")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..cli import _load
    from .report import format_results
    from .runner import evaluate, prepare

    # Everything that can be checked without the model (options, tasks, data, prompts) is, before loading it.
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise ValueError(f"--out {args.out}: the folder {Path(args.out).resolve().parent} does not exist")
    prepared = prepare(args.tasks, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                       seed=args.seed, data_dir=args.data_dir, perplexity_file=args.ppl_file,
                       perplexity_window=args.ppl_window, perplexity_stride=args.ppl_stride)

    # The model loads exactly as for every other command (the shared model options: dtype, quantization, ...).
    llm = _load(args)
    model_arg = getattr(args, "model_pos", None) or args.model
    loader = {k: getattr(args, k) for k in ("quantize", "skip", "adapter") if getattr(args, k, None)}
    model = {"model": model_arg or "(bundled tiny-falcon-shakespeare)", "revision": args.revision,
             **model_description(llm), "load_options": loader}
    out = evaluate(llm, prepared, progress=not args.no_progress, model=model)
    out["config"]["arguments"] = {k: v for k, v in vars(args).items()
                                  if k != "command" and isinstance(v, (str, int, float, bool, list, type(None)))}
    print(format_results(out, subjects=args.subjects))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 0
