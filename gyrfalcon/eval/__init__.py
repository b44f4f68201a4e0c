"""Evaluation: the Open LLM Leaderboard tasks and perplexity, with lm-evaluation-harness's numbers, faster.

    import gyrfalcon
    from gyrfalcon.eval import evaluate, format_results
    llm = gyrfalcon.load("tiiuae/falcon-7b")
    out = evaluate(llm, "arc_challenge,hellaswag,mmlu,truthfulqa_mc2", limit=100)
    print(format_results(out))

Layout: `scoring.py` (the loglikelihood engine: shared prefixes and contexts computed once, KV caches forked),
`tasks/` (one module per task family, the registry in `tasks/__init__.py`), `metrics.py`, `runner.py`
(`evaluate`), `report.py` (the table), `cli.py` (`gyrfalcon eval`), `harness.py` (the lm-eval model `gyrfalcon`),
`data.py` (where the data lives).
"""

from __future__ import annotations

from .data import EvalDataError, find_data_dir
from .report import format_results
from .runner import evaluate, leaderboard_average, prepare
from .scoring import Request, Scorer, encode_pair, encode_pairs
from .tasks import LEADERBOARD, TASKS, UnknownTaskError, get_task, parse_tasks

__all__ = ["LEADERBOARD", "TASKS", "EvalDataError", "Request", "Scorer", "UnknownTaskError", "encode_pair",
           "encode_pairs", "evaluate", "find_data_dir", "format_results", "get_task", "leaderboard_average", "prepare",
           "parse_tasks"]
