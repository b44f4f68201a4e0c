"""HellaSwag (validation split), lm-eval's `hellaswag`: the preprocessed "<activity>: <context>" and the
preprocessed endings; continuation " <ending>"; metrics acc and acc_norm.

Our data (llama.cpp's text form of the full validation split) is already preprocessed like lm-eval's `preprocess`
except for one thing: lm-eval joins `ctx_a + " " + ctx_b.capitalize()`, the file has `ctx_a + " " + ctx_b` as
written (ActivityNet's ctx_b is lower case: "... on a roof. he"). We restore the capital on the last sentence
fragment of ActivityNet items (those whose label is not a WikiHow category) when it starts with a lower-case letter;
this reproduces lm-eval's context except where ctx_b itself spans a sentence end or holds capitals (rare).

Few-shot examples (lm-eval: 10, from train, which our data lacks) are drawn from the validation split itself with
lm-eval's sampler and seed, the scored item excluded.
"""

from __future__ import annotations

from ..data import DataDir, EvalDataError
from .base import Doc, FewshotSampler, Task, doc_key, same_split_fewshot, take

FILE = "hellaswag/hellaswag_val_full.txt"

# WikiHow's top-level categories: the activity labels of HellaSwag's WikiHow items (everything else is ActivityNet).
WIKIHOW_CATEGORIES = frozenset({
    "Arts and Entertainment", "Cars & Other Vehicles", "Computers and Electronics", "Education and Communications",
    "Family Life", "Finance and Business", "Food and Entertaining", "Health", "Hobbies and Crafts",
    "Holidays and Traditions", "Home and Garden", "Personal Care and Style", "Pets and Animals",
    "Philosophy and Religion", "Relationships", "Sports and Fitness", "Travel", "Work World", "Youth",
})


def restore_capital(query: str) -> str:
    """"<label>: ... on a roof. he" -> "<label>: ... on a roof. He" for ActivityNet items (see the docstring)."""
    label, sep, ctx = query.partition(": ")
    if not sep or label in WIKIHOW_CATEGORIES:
        return query
    cut = ctx.rfind(". ")
    start = cut + 2 if cut >= 0 else 0
    if start < len(ctx) and ctx[start].islower():
        ctx = ctx[:start] + ctx[start].upper() + ctx[start + 1 :]
    return label + sep + ctx


def parse(text: str) -> list[dict]:
    lines = text.split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise EvalDataError(f"{FILE}: {len(lines)} lines is not a multiple of 6 (query, label, four endings per item)")
    items = []
    for i in range(0, len(lines), 6):
        label = lines[i + 1].strip()
        if label not in {"0", "1", "2", "3"}:
            raise EvalDataError(f"{FILE}:{i + 2}: expected the gold label 0-3, got {label!r}")
        items.append({"query": lines[i], "gold": int(label), "endings": lines[i + 2 : i + 6]})
    return items


class HellaSwagTask(Task):
    name = "hellaswag"
    kind = "loglikelihood"
    default_fewshot = 10
    metric_names = ("acc", "acc_norm")
    leaderboard_metric = "acc_norm"
    description = "HellaSwag validation, sentence completion, acc and acc_norm"

    def fewshot_source(self, k: int) -> str:
        return same_split_fewshot(k, "validation", "HellaSwag")

    def notes(self) -> list[str]:
        return ["context: ctx_b's capital restored heuristically (the raw ctx_a/ctx_b split is not in our data)"]

    def docs(self, data: DataDir, num_fewshot: int, limit: int | None, seed: int) -> list[Doc]:
        rows = parse(data.read_text(FILE, self.name))
        keys = [doc_key(r) for r in rows]
        sampler = FewshotSampler(keys, seed)
        queries = [restore_capital(r["query"]) for r in rows]
        docs = []
        for i, r in enumerate(take(rows, limit)):
            shots = sampler.sample(num_fewshot, exclude=keys[i])
            fewshot = "".join(f"{queries[j]} {rows[j]['endings'][rows[j]['gold']]}\n\n" for j in shots)
            context = fewshot + queries[i]
            docs.append(Doc(requests=[(context, " " + e) for e in r["endings"]], gold=r["gold"],
                            choices=list(r["endings"])))
        return docs
