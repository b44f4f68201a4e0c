"""GSM8K (test), lm-eval's `gsm8k`: 5-shot from train, greedy generation until "Question:", exact match on the
final number.

    Question: <q>\\nAnswer: <worked solution ending "#### <n>">\\n\\n     x 5 (random train items, lm-eval's sampler)
    Question: <q>\\nAnswer:                                             -> generate (greedy, 256 tokens at most)

Two answer extractions, as lm-eval reports them: strict-match (the first "#### <number>") and flexible-extract (the
last number in the text). Both are compared with the reference's final number after dropping commas, "$" and a
final period, ignoring case.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..data import DataDir, EvalDataError
from ..metrics import exact_match, extract_answer, mean_metric
from .base import Doc, FewshotSampler, Task, TaskResult, doc_key, take

STOP = ("Question:", "</s>", "<|im_end|>")
MAX_NEW_TOKENS = 256


class GSM8KTask(Task):
    name = "gsm8k"
    kind = "generate"
    default_fewshot = 5
    metric_names = ("exact_match,strict-match", "exact_match,flexible-extract")
    leaderboard_metric = "exact_match,strict-match"
    description = "GSM8K test, 5-shot chain of thought, exact match of the final number"
    stop = STOP
    max_new_tokens = MAX_NEW_TOKENS

    def fewshot_source(self, k: int) -> str:
        if k == 0:
            return "none (0-shot)"
        return f"the train split, {k} random items per question (lm-eval's sampler and seed)"

    def docs(self, data: DataDir, num_fewshot: int, limit: int | None, seed: int) -> list[Doc]:
        test = data.read_jsonl("gsm8k/test.jsonl", self.name)
        train = data.read_jsonl("gsm8k/train.jsonl", self.name) if num_fewshot else []
        for name, rows in (("test", test), ("train", train)):
            for n, r in enumerate(rows, 1):
                if not (isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)):
                    raise EvalDataError(f"gsm8k/{name}.jsonl:{n}: expected question and answer strings")
        sampler = FewshotSampler([doc_key(r) for r in train], seed)
        docs = []
        for r in take(test, limit):
            shots = sampler.sample(num_fewshot)
            fewshot = "".join(f"Question: {train[j]['question']}\nAnswer: {train[j]['answer']}\n\n" for j in shots)
            docs.append(Doc(prompt=f"{fewshot}Question: {r['question']}\nAnswer:", target=r["answer"]))
        return docs

    def score_generation(self, doc: Doc, text: str) -> dict[str, float]:
        return {
            "exact_match,strict-match": exact_match(extract_answer(text, flexible=False), doc.target),
            "exact_match,flexible-extract": exact_match(extract_answer(text, flexible=True), doc.target),
        }

    def aggregate(self, docs: Sequence[Doc], scores: Sequence[dict[str, float]]) -> TaskResult:
        return TaskResult([mean_metric(m, [s[m] for s in scores]) for m in self.metric_names], len(docs))

