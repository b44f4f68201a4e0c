"""WinoGrande (xl, validation), lm-eval's `winogrande` with partial scoring: the sentence up to the blank is filled
with each option (two contexts), and the same rest of the sentence is scored after each:

    <few-shot>...<sentence up to the blank, option k>      continuation " <rest of the sentence>"     metric acc

Few-shot examples are the sentence filled with its right option, then the rest ("... Maria always got ...").
lm-eval draws them from train, which our data (llm-foundry's jsonl of the dev split) lacks: we draw them from the
dev split itself with lm-eval's sampler and seed, the scored item excluded. The two contexts of an item share the
few-shot block and the sentence start, which the scorer runs once per item.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..data import DataDir, EvalDataError
from ..metrics import argmax
from .base import Doc, FewshotSampler, Task, doc_key, same_split_fewshot, take

FILE = "winogrande/winogrande_xl_dev.jsonl"


class WinograndeTask(Task):
    name = "winogrande"
    kind = "loglikelihood"
    default_fewshot = 5
    metric_names = ("acc",)
    leaderboard_metric = "acc"
    description = "WinoGrande xl dev, partial scoring, acc"

    def fewshot_source(self, k: int) -> str:
        return same_split_fewshot(k, "dev", "WinoGrande")

    def docs(self, data: DataDir, num_fewshot: int, limit: int | None, seed: int) -> list[Doc]:
        rows = data.read_jsonl(FILE, self.name)
        for n, r in enumerate(rows, 1):
            opts = r.get("context_options")
            if not (isinstance(opts, list) and len(opts) == 2 and isinstance(r.get("continuation"), str)
                    and r.get("gold") in (0, 1)):
                raise EvalDataError(f"{FILE}:{n}: expected two context_options, a continuation and gold 0/1")
        keys = [doc_key(r) for r in rows]
        sampler = FewshotSampler(keys, seed)
        docs = []
        for i, r in enumerate(take(rows, limit)):
            shots = sampler.sample(num_fewshot, exclude=keys[i])
            fewshot = "".join(f"{rows[j]['context_options'][rows[j]['gold']]} {rows[j]['continuation'].strip()}\n\n"
                              for j in shots)
            rest = " " + r["continuation"].strip()
            docs.append(Doc(requests=[(fewshot + opt, rest) for opt in r["context_options"]], gold=r["gold"],
                            choices=list(r["context_options"]), group=f"winogrande/{i}"))
        return docs

    def score(self, doc: Doc, results: Sequence[tuple[float, bool]]) -> dict[str, float]:
        return {"acc": float(argmax([ll for ll, _ in results]) == doc.gold)}
