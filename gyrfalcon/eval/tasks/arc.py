"""ARC-Challenge / ARC-Easy (AI2 Reasoning Challenge), lm-eval's `arc_challenge` / `arc_easy` prompt.

    Question: <question>\\nAnswer:     continuation " <choice text>"      metrics acc, acc_norm

Few-shot examples are "Question: ...\\nAnswer: <gold text>" joined by blank lines. lm-eval draws them from ARC's
train split, which our data (llm-foundry's jsonl of the test split) lacks: we draw them from the test split with
lm-eval's sampler (seeded, in document order), leaving out the scored question.
"""

from __future__ import annotations

from ..data import DataDir, EvalDataError
from .base import Doc, FewshotSampler, Task, doc_key, same_split_fewshot, take


class ArcTask(Task):
    kind = "loglikelihood"
    default_fewshot = 25
    metric_names = ("acc", "acc_norm")

    def __init__(self, name: str, filename: str, leaderboard: bool):
        self.name = name
        self.filename = filename
        self.leaderboard_metric = "acc_norm" if leaderboard else None
        self.description = f"{name.replace('_', '-')} test, multiple choice, acc and length-normalized acc_norm"

    def fewshot_source(self, k: int) -> str:
        return same_split_fewshot(k, "test", "ARC", "question")

    def docs(self, data: DataDir, num_fewshot: int, limit: int | None, seed: int) -> list[Doc]:
        rows = data.read_jsonl(f"arc/{self.filename}", self.name)
        for n, r in enumerate(rows, 1):
            if not (isinstance(r.get("query"), str) and isinstance(r.get("choices"), list)
                    and isinstance(r.get("gold"), int) and 0 <= r["gold"] < len(r["choices"])):
                raise EvalDataError(f"arc/{self.filename}:{n}: expected query, choices and a gold index")
        keys = [doc_key(r) for r in rows]
        sampler = FewshotSampler(keys, seed)
        docs = []
        for i, r in enumerate(take(rows, limit)):
            shots = sampler.sample(num_fewshot, exclude=keys[i])
            fewshot = "".join(f"{rows[j]['query']}\nAnswer: {rows[j]['choices'][rows[j]['gold']]}\n\n" for j in shots)
            context = f"{fewshot}{r['query']}\nAnswer:"
            docs.append(Doc(requests=[(context, " " + c) for c in r["choices"]], gold=r["gold"],
                            choices=list(r["choices"])))
        return docs
