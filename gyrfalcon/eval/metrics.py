"""Metric arithmetic, as lm-evaluation-harness does it (means with the sample standard error, its pooled and
unweighted group errors, its multiple-choice accuracies and its GSM8K answer extraction and exact match)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Metric:
    """One reported number. `stderr` is None where it is not defined (one item, perplexity)."""

    name: str
    value: float
    stderr: float | None = None

    def to_json(self) -> dict:
        return {"value": self.value, "stderr": self.stderr}


def mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def mean_stderr(xs: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1) over sqrt(n), lm-eval's `mean_stderr`; None for fewer than 2 items."""
    n = len(xs)
    if n < 2:
        return None
    mu = mean(xs)
    return math.sqrt(math.fsum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def mean_metric(name: str, xs: Sequence[float]) -> Metric:
    return Metric(name, mean(xs), mean_stderr(xs))


def pooled_stderr(stderrs: Sequence[float | None], sizes: Sequence[int]) -> float | None:
    """Standard error of a size-weighted group mean (lm-eval's `pooled_sample_stderr`)."""
    if any(s is None for s in stderrs) or sum(sizes) <= len(sizes):
        return None
    var = math.fsum((n - 1) * s**2 * n for n, s in zip(sizes, stderrs, strict=True)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def unweighted_stderr(stderrs: Sequence[float | None]) -> float | None:
    """Standard error of the plain mean of k independent means (lm-eval's `unweighted_mean_stderr`)."""
    if any(s is None for s in stderrs):
        return None
    return math.sqrt(math.fsum(s**2 for s in stderrs)) / len(stderrs)


def argmax(xs: Sequence[float]) -> int:
    """Index of the first maximum (numpy's argmax tie rule)."""
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def multiple_choice(lls: Sequence[float], gold: int, choices: Sequence[str]) -> dict[str, float]:
    """acc: the most likely choice is gold; acc_norm: the same after dividing each loglikelihood by its choice's
    length in characters (lm-eval's `completion_len`; the choice text without the leading space)."""
    pred = argmax(lls)
    pred_norm = argmax([ll / float(len(c)) for ll, c in zip(lls, choices, strict=True)])
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}


# ----------------------------------------------------------------------------------------------------------------
# GSM8K: lm-eval's two answer filters and its exact-match normalization

STRICT_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_ANSWER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORED = (",", "\\$", "(?s).*#### ", "\\.$")
INVALID = "[invalid]"


def extract_answer(text: str, flexible: bool) -> str:
    """strict-match: the first "#### <number>"; flexible-extract: the last number-like run in the text."""
    found = (FLEXIBLE_ANSWER if flexible else STRICT_ANSWER).findall(text)
    if not found:
        return INVALID
    m = found[-1] if flexible else found[0]
    if isinstance(m, tuple):
        m = next((g for g in m if g), INVALID)
    return m.strip()


def normalize_answer(text: str) -> str:
    for pattern in IGNORED:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))
