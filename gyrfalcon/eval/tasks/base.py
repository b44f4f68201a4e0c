"""What every task is: documents in, per-document scores, then aggregate metrics.

A task builds `Doc`s from the data folder (prompts exactly as lm-evaluation-harness writes them, few-shot examples
included), the runner computes what the kind of task needs (loglikelihoods, generations, rolling loglikelihoods),
and the task turns those into per-document scores and aggregates them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data import DataDir
from ..metrics import Metric, mean_metric, multiple_choice

# lm-eval's default few-shot seed (`--fewshot_random_seed`).
DEFAULT_SEED = 1234


@dataclass
class Doc:
    """One scored item.

    Loglikelihood tasks: `requests` are (context, continuation) pairs, `gold` the right choice, `choices` the answer
    texts (for length normalization), `group` a hint that the item's contexts share a long prefix with others.
    Generation tasks: `prompt` and `target`.
    """

    requests: list[tuple[str, str]] = field(default_factory=list)
    gold: int = 0
    choices: list[str] = field(default_factory=list)
    group: Hashable | None = None
    prompt: str | None = None
    target: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskResult:
    """A task's aggregate: its metrics (the first is the headline) and, for MMLU, the breakdown."""

    metrics: list[Metric]
    n: int
    breakdown: dict[str, Any] = field(default_factory=dict)


def same_split_fewshot(k: int, split: str, dataset: str, unit: str = "item") -> str:
    """The few-shot source of a task whose train split (lm-eval's source) is not in our data: examples drawn from
    the scored split itself, the scored one excluded, with lm-eval's sampler and a fixed seed."""
    if k == 0:
        return "none (0-shot)"
    return (f"the {split} split itself ({dataset} train is not in our data), {k} random {unit}s per item with "
            f"lm-eval's sampler and seed, the scored {unit} excluded")


class Task:
    """Base class. Subclasses set the class attributes and implement `docs`."""

    name: str = ""
    kind: str = "loglikelihood"  # "loglikelihood" | "generate" | "perplexity"
    default_fewshot: int = 0
    max_fewshot: int | None = None  # None: no limit; 0: zero-shot only
    metric_names: tuple[str, ...] = ("acc", "acc_norm")
    leaderboard_metric: str | None = None
    description: str = ""

    def fewshot_source(self, k: int) -> str:
        return "none (0-shot)" if k == 0 else ""

    def docs(self, data: DataDir, num_fewshot: int, limit: int | None, seed: int) -> list[Doc]:
        raise NotImplementedError

    def notes(self) -> list[str]:
        return []

    def check_fewshot(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {k}")
        if self.max_fewshot is not None and k > self.max_fewshot:
            raise ValueError(f"task {self.name!r} takes at most {self.max_fewshot} few-shot examples, got {k}")

    # scoring of loglikelihood tasks (one (ll, is_greedy) per request of the doc)
    def score(self, doc: Doc, results: Sequence[tuple[float, bool]]) -> dict[str, float]:
        scores = multiple_choice([ll for ll, _ in results], doc.gold, doc.choices)
        return {k: v for k, v in scores.items() if k in self.metric_names}

    def aggregate(self, docs: Sequence[Doc], scores: Sequence[dict[str, float]]) -> TaskResult:
        metrics = [mean_metric(m, [s[m] for s in scores]) for m in self.metric_names]
        return TaskResult(metrics, len(docs))


def take(rows: list, limit: int | None) -> list:
    return rows if limit is None else rows[:limit]


def doc_key(row: Any) -> str:
    """A value to compare documents by (lm-eval drops the few-shot examples *equal* to the scored document)."""
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


class FewshotSampler:
    """lm-eval's default sampler: one `random.Random(seed)` drawn from in document order.

    From another split: `k` documents at random. From the scored split itself: `k + 1` at random, those equal to
    the scored document dropped, the first `k` kept (and a fresh draw without it when duplicates left too few).
    """

    def __init__(self, pool_keys: Sequence[str], seed: int):
        self.keys = list(pool_keys)
        self.rnd = random.Random(seed)

    def sample(self, k: int, exclude: str | None = None) -> list[int]:
        if k == 0:
            return []
        n = len(self.keys)
        if exclude is None:
            if k > n:
                raise ValueError(f"{k} few-shot examples asked for, but the few-shot pool has only {n}")
            return self.rnd.sample(range(n), k)
        if k + 1 > n:
            raise ValueError(f"{k} few-shot examples asked for, but the pool (the scored split) has only {n} items")
        picks = [i for i in self.rnd.sample(range(n), k + 1) if self.keys[i] != exclude][:k]
        if len(picks) < k:
            pool = [i for i in range(n) if self.keys[i] != exclude]
            picks = self.rnd.sample(pool, k)
        return picks
