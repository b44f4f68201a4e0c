"""Quality of each quantization mode on the bundled trained model: held-out perplexity and greedy agreement.

    python benchmarks/quant_quality.py                      # fp32, int8, llm.int8, nf4, fp4
    python benchmarks/quant_quality.py --model DIR --text FILE --json out.json

* perplexity on the held-out split the training run kept out (the last 10% of the tokens of tiny Shakespeare,
  `gyrfalcon.train.data.split_tokens`), in non-overlapping windows of the model's context; the targets are
  int8 <= +1% and nf4 <= +5% against fp32;
* greedy agreement: for each of the seed's five prompts, how many of the first `--new-tokens` greedy tokens equal
  fp32's (the matching prefix length), and how many positions agree overall.

Quality numbers do not depend on timing; the script runs single-threaded by default (`--threads`) so that a busy
second core does not slow it down.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import gyrfalcon
from gyrfalcon.bench import DEFAULT_PROMPTS
from gyrfalcon.train.data import split_tokens, tokenize_file

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "tinyshakespeare" / "input.txt"


def perplexity(llm, tokens: torch.Tensor, window: int) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for a in range(0, len(tokens) - 1, window):
            ids = tokens[a : a + window + 1].long()
            if len(ids) < 2:
                break
            logits = llm.model(ids[None, :-1])[0].float()
            nll += F.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += len(ids) - 1
    return float(torch.exp(torch.tensor(nll / count)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model dir (default: the bundled tiny Shakespeare Falcon)")
    ap.add_argument("--text", default=str(DEFAULT_TEXT), help="the training text (its last 10%% is held out)")
    ap.add_argument("--modes", default="int8,llm.int8,nf4,fp4")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, help="score at most this many held-out tokens")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = gyrfalcon.load(args.model, device="cpu")
    _, held = split_tokens(tokenize_file(args.text, base.tokenizer.encode), 0.1)
    if args.max_tokens:
        held = held[: args.max_tokens]
    window = base.max_context or 256
    modes = ["fp32", *[m for m in args.modes.split(",") if m]]
    greedy: dict[str, list[list[int]]] = {}
    rows = []
    for mode in modes:
        llm = base if mode == "fp32" else gyrfalcon.load(args.model, device="cpu", quantize=mode)
        ppl = perplexity(llm, held, window)
        greedy[mode] = [c.token_ids for p in DEFAULT_PROMPTS
                        for c in llm.generate(p, max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)]
        rows.append({"mode": mode, "perplexity": ppl})
        print(f"{mode}: perplexity {ppl:.4f}", flush=True)
    base_ppl = rows[0]["perplexity"]
    for r in rows:
        r["perplexity_delta_pct"] = 100 * (r["perplexity"] / base_ppl - 1)
        pref, same, total = [], 0, 0
        for a, b in zip(greedy[r["mode"]], greedy["fp32"], strict=True):
            pref.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))))
            same += sum(x == y for x, y in zip(a, b, strict=False))
            total += len(b)
        r["greedy_match_prefix"] = pref
        r["greedy_agreement"] = same / total
    print(f"\nheld-out tokens: {len(held)} (window {window}); greedy: {len(DEFAULT_PROMPTS)} seed prompts x "
          f"{args.new_tokens} tokens")
    print(f"{'mode':<10}{'perplexity':>12}{'vs fp32':>10}   matching greedy prefix per prompt (of {args.new_tokens})"
          "   agreement")
    for r in rows:
        print(f"{r['mode']:<10}{r['perplexity']:>12.4f}{r['perplexity_delta_pct']:>+9.3f}%   "
              f"{str(r['greedy_match_prefix']):<40}   {100 * r['greedy_agreement']:.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"held_out_tokens": len(held), "window": window, "rows": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
