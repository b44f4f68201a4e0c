"""The task registry: every task name `gyrfalcon eval --tasks` accepts, in one place.

    arc_challenge, arc_easy      25-shot      acc, acc_norm          arc.py
    hellaswag                    10-shot      acc, acc_norm          hellaswag.py
    mmlu, mmlu_<subject>         5-shot       acc (micro), macro     mmlu.py
    truthfulqa_mc1, _mc2         0-shot       acc                    truthfulqa.py
    winogrande                   5-shot       acc                    winogrande.py
    gsm8k                        5-shot       exact match            gsm8k.py
    perplexity                   -            token ppl, bits/byte   perplexity.py
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from .arc import ArcTask
from .base import DEFAULT_SEED, Doc, Task, TaskResult
from .gsm8k import GSM8KTask
from .hellaswag import HellaSwagTask
from .mmlu import SUBJECTS, MMLUTask
from .perplexity import PerplexityTask
from .truthfulqa import TruthfulQATask
from .winogrande import WinograndeTask

TASKS: dict[str, Callable[[], Task]] = {
    "arc_challenge": lambda: ArcTask("arc_challenge", "arc_challenge_test.jsonl", leaderboard=True),
    "arc_easy": lambda: ArcTask("arc_easy", "arc_easy_test.jsonl", leaderboard=False),
    "hellaswag": HellaSwagTask,
    "mmlu": MMLUTask,
    "truthfulqa_mc1": lambda: TruthfulQATask("mc1"),
    "truthfulqa_mc2": lambda: TruthfulQATask("mc2"),
    "winogrande": WinograndeTask,
    "gsm8k": GSM8KTask,
    "perplexity": PerplexityTask,
}
for _subject in SUBJECTS:
    TASKS[f"mmlu_{_subject}"] = (lambda s: lambda: MMLUTask([s]))(_subject)

# The Open LLM Leaderboard (v1): its six tasks, the shots it used and the metric it averaged.
LEADERBOARD = {
    "arc_challenge": ("acc_norm", 25),
    "hellaswag": ("acc_norm", 10),
    "mmlu": ("acc_macro", 5),
    "truthfulqa_mc2": ("acc", 0),
    "winogrande": ("acc", 5),
    "gsm8k": ("exact_match,strict-match", 5),
}


class UnknownTaskError(ValueError):
    pass


def task_names(include_subjects: bool = False) -> list[str]:
    return [n for n in TASKS if include_subjects or not n.startswith("mmlu_")]


def get_task(name: str) -> Task:
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownTaskError(f"unknown task {name!r}{hint}; known tasks: {', '.join(task_names())} "
                               f"and mmlu_<subject> for one MMLU subject")
    return TASKS[name]()


def parse_tasks(spec: str | list[str]) -> list[str]:
    """"arc_challenge,hellaswag" (or a list) -> names, checked, duplicates dropped, order kept."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for n in (x.strip() for x in names):
        if not n:
            continue
        get_task(n)  # raises for an unknown name
        if n not in out:
            out.append(n)
    if not out:
        raise UnknownTaskError(f"no task given; known tasks: {', '.join(task_names())}")
    return out


__all__ = ["DEFAULT_SEED", "LEADERBOARD", "TASKS", "Doc", "Task", "TaskResult", "UnknownTaskError", "get_task",
           "parse_tasks", "task_names"]
