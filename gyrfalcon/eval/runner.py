"""`evaluate`: run tasks on a loaded model and return the results (JSON-ready), with a progress bar and ETA.

Every task is built first (documents, prompts, token requests), so the progress bar knows the whole run's work in
tokens through the model; then each task runs: loglikelihood tasks through the `Scorer`, GSM8K through the one
generation loop (`LLM.generate`, greedy, stop strings), perplexity as sliding-window loglikelihoods.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import DataDir, find_data_dir
from .metrics import mean
from .scoring import Plan, Request, Scorer
from .tasks import DEFAULT_SEED, LEADERBOARD, Doc, Task, get_task, parse_tasks
from .tasks.perplexity import PerplexityTask

DEFAULT_BATCH_SIZE = 16


@dataclass
class _Job:
    name: str
    task: Task
    num_fewshot: int
    docs: list[Doc]
    notes: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    plan: Plan | None = None
    prompts: list[list[int]] = field(default_factory=list)
    cost: int = 0


def check_options(limit: int | None, num_fewshot: int | None, batch_size: int, seed: int) -> None:
    """The numeric options, with messages that name the option."""
    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if limit is not None and (not is_int(limit) or limit < 1):
        raise ValueError(f"limit must be a positive number of items per task, got {limit!r}")
    if num_fewshot is not None and (not is_int(num_fewshot) or num_fewshot < 0):
        raise ValueError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def model_description(llm) -> dict[str, Any]:
    """What was evaluated: checkpoint, family, compute dtype, device, and the quantized / adapted modules by class
    (found on the model itself, so a pre-quantized checkpoint is described too)."""
    swapped: dict[str, int] = {}
    for m in llm.model.modules():
        kind = type(m)
        if ".quant." in kind.__module__ or "lora" in kind.__name__.lower():
            swapped[kind.__name__] = swapped.get(kind.__name__, 0) + 1
    return {
        "path": str(llm.path),
        "family": type(llm.model).__name__,
        "dtype": str(llm.dtype).replace("torch.", ""),
        "device": str(llm.device),
        "parameters": sum(p.numel() for p in llm.model.parameters()),
        "swapped_modules": swapped or None,
    }


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr, desc="eval",
                mininterval=0.5,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tok [{elapsed}<{remaining}, "
                           "{rate_fmt}]")


@dataclass
class Prepared:
    """Everything a run needs that does not need the model: tasks, documents and prompts, options, data."""

    names: list[str]
    jobs: list[_Job]
    data: DataDir
    options: dict[str, Any]


def prepare(
    tasks: str | Sequence[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
    data_dir: str | None = None,
    perplexity_file: str | None = None,
    perplexity_window: int | None = None,
    perplexity_stride: int | None = None,
) -> Prepared:
    """Check the options and build every task's documents (so that bad input fails before a model loads)."""
    names = parse_tasks(tasks)
    check_options(limit, num_fewshot, batch_size, seed)
    for what, v in (("perplexity_window", perplexity_window), ("perplexity_stride", perplexity_stride)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{what} must be a positive number of tokens, got {v!r}")
    data = find_data_dir(data_dir)
    jobs: list[_Job] = []
    for name in names:
        task = get_task(name)
        if isinstance(task, PerplexityTask):
            task = PerplexityTask(perplexity_file, perplexity_window, perplexity_stride)
        notes = list(task.notes())
        if task.max_fewshot == 0:
            k = task.default_fewshot
            if num_fewshot:
                notes.append(f"num_fewshot={num_fewshot} not applied: this task has a fixed prompt")
        else:
            k = task.default_fewshot if num_fewshot is None else num_fewshot
            task.check_fewshot(k)
        docs = task.docs(data, k, limit, seed)
        if not docs:
            raise ValueError(f"task {name!r} has no items in {data.root}")
        jobs.append(_Job(name, task, k, docs, notes))
    options = dict(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, seed=seed)
    if any(isinstance(j.task, PerplexityTask) for j in jobs):
        options["perplexity"] = {"file": perplexity_file, "window": perplexity_window, "stride": perplexity_stride}
    return Prepared(names, jobs, data, options)


def evaluate(llm, tasks: str | Sequence[str] | Prepared, *, progress: bool = True,
             model: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Evaluate `llm` (a `gyrfalcon.LLM`) on `tasks` ("arc_challenge,hellaswag", a list of names, or `prepare`'s
    result).

    Options (see `prepare`): limit: the first N items of each task (of each MMLU subject; N windows for
    perplexity); num_fewshot: overrides every task's default shots (fixed-prompt tasks like TruthfulQA keep theirs);
    batch_size: contexts per forward; seed: the few-shot sampler's; data_dir; perplexity_file / _window / _stride.
    Returns {"results", "leaderboard_average", "config", "data", "timing"}; `format_results` prints it.
    """
    prepared = tasks if isinstance(tasks, Prepared) else prepare(tasks, **options)
    opts = prepared.options
    scorer = Scorer.for_llm(llm, batch_size=opts["batch_size"])
    started = time.perf_counter()
    jobs = prepared.jobs
    for job in jobs:
        _prepare(job, scorer, llm)
    bar = _progress_bar(sum(j.cost for j in jobs), progress)
    results: dict[str, Any] = {}
    try:
        for job in jobs:
            if bar is not None:
                bar.set_description_str(job.name)
            t0 = time.perf_counter()
            results[job.name] = _run(job, scorer, llm, bar)
            results[job.name]["seconds"] = round(time.perf_counter() - t0, 3)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started

    from .. import __version__

    config = {
        "tasks": prepared.names,
        "model": model if model is not None else model_description(llm),
        **{k: v for k, v in opts.items() if k != "perplexity"},
        "max_length": scorer.max_length,
        "gyrfalcon_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if "perplexity" in opts:
        config["perplexity"] = opts["perplexity"]
    data = prepared.data
    return {
        "results": results,
        "leaderboard_average": leaderboard_average(results),
        "config": config,
        "data": {"dir": str(data.root), "is_sample": data.is_sample, "files": dict(sorted(data.files.items()))},
        "timing": {"seconds": round(elapsed, 3), "model_tokens": sum(j.cost for j in jobs)},
    }


def _prepare(job: _Job, scorer: Scorer, llm) -> None:
    """Token requests (and the work they mean) for one task."""
    task = job.task
    if task.kind == "loglikelihood":
        pairs = [r for d in job.docs for r in d.requests]
        groups = [d.group for d in job.docs for _ in d.requests]
        job.requests = scorer.requests(pairs, groups)
    elif task.kind == "perplexity":
        job.requests = task.requests(job.docs[0], llm.tokenizer, scorer.prefix_token_id, scorer.max_length)
    if job.requests:
        job.plan = scorer.plan(job.requests)
        job.cost = job.plan.tokens
    if task.kind == "generate":
        keep = scorer.max_length - task.max_new_tokens
        if keep < 1:
            raise ValueError(f"the model's context ({scorer.max_length}) leaves no room for a prompt before "
                             f"{task.max_new_tokens} generated tokens")
        # As lm-eval: a prompt too long for the context loses tokens at its left.
        job.prompts = [llm.encode(d.prompt)[-keep:] for d in job.docs]
        job.cost = sum(len(p) + task.max_new_tokens for p in job.prompts)


def _run(job: _Job, scorer: Scorer, llm, bar) -> dict[str, Any]:
    task = job.task
    tick = bar.update if bar is not None else None
    breakdown: dict[str, Any] = {}
    if task.kind == "loglikelihood":
        lls = scorer.run(job.plan, tick)
        scores, at = [], 0
        for d in job.docs:
            scores.append(task.score(d, lls[at : at + len(d.requests)]))
            at += len(d.requests)
        agg = task.aggregate(job.docs, scores)
    elif task.kind == "perplexity":
        agg = task.aggregate_rolling(job.docs[0], scorer.run(job.plan, tick))
    else:
        texts = _generate(job, scorer, llm, tick)
        scores = [task.score_generation(d, t) for d, t in zip(job.docs, texts, strict=True)]
        agg = task.aggregate(job.docs, scores)
        breakdown["generations_sample"] = texts[:3]
    breakdown.update(agg.breakdown)
    out = {
        "n": agg.n,
        "num_fewshot": job.num_fewshot,
        "fewshot_source": task.fewshot_source(job.num_fewshot),
        "metrics": {m.name: m.to_json() for m in agg.metrics},
        "description": task.description,
    }
    if job.notes:
        out["notes"] = job.notes
    if breakdown:
        out["breakdown"] = breakdown
    return out


def _generate(job: _Job, scorer: Scorer, llm, tick) -> list[str]:
    """Greedy generations for every prompt, batched by length (longest first), in document order."""
    from ..runtime.sampling import SamplingParams

    task = job.task
    params = SamplingParams(max_new_tokens=task.max_new_tokens, temperature=0.0, stop=tuple(task.stop))
    order = sorted(range(len(job.prompts)), key=lambda i: (-len(job.prompts[i]), i))
    texts: list[str] = [""] * len(order)
    for start in range(0, len(order), scorer.batch_size):
        batch = order[start : start + scorer.batch_size]
        for i, c in zip(batch, llm.generate([job.prompts[i] for i in batch], params), strict=True):
            texts[i] = c.text
        if tick is not None:
            tick(sum(len(job.prompts[i]) + task.max_new_tokens for i in batch))
    return texts


def leaderboard_average(results: dict[str, Any]) -> dict[str, Any] | None:
    """The Open LLM Leaderboard (v1) average over its tasks present in `results` (None when none is)."""
    used = {}
    for name, (metric, shots) in LEADERBOARD.items():
        r = results.get(name)
        if r is not None and metric in r["metrics"]:
            used[name] = {"metric": metric, "value": r["metrics"][metric]["value"], "num_fewshot": r["num_fewshot"],
                          "leaderboard_num_fewshot": shots}
    if not used:
        return None
    return {
        "value": mean([u["value"] for u in used.values()]),
        "tasks": used,
        "of": len(LEADERBOARD),
        "missing": [n for n in LEADERBOARD if n not in used],
    }
