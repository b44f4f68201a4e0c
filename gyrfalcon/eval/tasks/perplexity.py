"""Perplexity of a text file with a sliding window: token perplexity and bits per byte.

The text is encoded whole, and an end-of-text token put in front so that its first token is scored too. Windows of
`window` tokens slide by `stride`: the first scores its `window` tokens, each next one scores the `stride` tokens
after the previous one, conditioned on the `window - stride` tokens before them. With stride == window the windows
are disjoint and the total equals lm-eval's `loglikelihood_rolling`; a smaller stride gives every scored token more
context (the default is half a window). Each window is one loglikelihood request (context = the tokens it conditions
on, continuation = the tokens it scores), so the scorer's batching and memory bounds apply.

    token_perplexity = exp(-sum log p / scored tokens)
    bits_per_byte    = -sum log p / (ln 2 * UTF-8 bytes of the scored text)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..data import SAMPLE_DIR, DataDir, EvalDataError
from ..metrics import Metric
from ..scoring import Request
from .base import Doc, Task, TaskResult

DEFAULT_TEXT = "perplexity/tinyshakespeare_excerpt.txt"


def windows(tokens: Sequence[int], prefix_token: int, window: int, stride: int) -> list[Request]:
    """The sliding windows over `tokens` as (context, continuation) token requests (see the module docstring)."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(window, len(tokens))
    out = [Request((prefix_token,), tuple(tokens[:first]))]
    done = first
    while done < len(tokens):
        n = min(stride, len(tokens) - done)
        end = done + n
        out.append(Request(tuple(tokens[end - window - 1 : end - n]), tuple(tokens[end - n : end])))
        done = end
    return out


class PerplexityTask(Task):
    name = "perplexity"
    kind = "perplexity"
    default_fewshot = 0
    max_fewshot = 0
    metric_names = ("token_perplexity", "bits_per_byte")
    description = "perplexity of a text file, sliding window"

    def __init__(self, path: str | Path | None = None, window: int | None = None, stride: int | None = None):
        self.path = Path(path) if path is not None else None
        self.window = window
        self.stride = stride

    def fewshot_source(self, k: int) -> str:
        return "not applicable"

    def text(self, data: DataDir) -> tuple[str, str]:
        """(text, where it came from)."""
        if self.path is not None:
            if not self.path.is_file():
                raise EvalDataError(f"perplexity text file {self.path} does not exist")
            try:
                return self.path.read_text(encoding="utf-8"), str(self.path)
            except UnicodeDecodeError as e:
                raise EvalDataError(f"{self.path} is not UTF-8 text: {e}") from e
        if data.exists(DEFAULT_TEXT):
            return data.read_text(DEFAULT_TEXT, self.name), str(data.root / DEFAULT_TEXT)
        sample = DataDir(SAMPLE_DIR, is_sample=True)
        text = sample.read_text(DEFAULT_TEXT, self.name)
        data.files.update({f"(sample) {k}": v for k, v in sample.files.items()})
        return text, str(SAMPLE_DIR / DEFAULT_TEXT)

    def docs(self, data: DataDir, num_fewshot: int, limit: int | None, seed: int) -> list[Doc]:
        text, source = self.text(data)
        if not text:
            raise EvalDataError(f"perplexity text {source} is empty")
        return [Doc(meta={"text": text, "source": source, "limit": limit})]

    def requests(self, doc: Doc, tokenizer, prefix_token: int, max_length: int) -> list[Request]:
        window = self.window or max_length
        stride = self.stride or max(1, window // 2)
        doc.meta.update(window=window, stride=stride)
        tokens = tokenizer.encode(doc.meta["text"], add_special_tokens=False)
        reqs = windows(tokens, prefix_token, window, stride)
        if doc.meta["limit"] is not None:
            reqs = reqs[: doc.meta["limit"]]
        scored = [t for r in reqs for t in r.continuation]
        doc.meta["tokens"] = len(scored)
        doc.meta["bytes"] = (len(doc.meta["text"].encode("utf-8")) if len(scored) == len(tokens)
                             else len(tokenizer.decode(scored).encode("utf-8")))
        doc.meta["windows"] = len(reqs)
        return reqs

    def aggregate_rolling(self, doc: Doc, results: Sequence[tuple[float, bool]]) -> TaskResult:
        total = math.fsum(ll for ll, _ in results)
        ppl = math.exp(-total / doc.meta["tokens"])
        bpb = -total / (math.log(2) * doc.meta["bytes"])
        info = {k: doc.meta[k] for k in ("source", "window", "stride", "windows", "tokens", "bytes")}
        info["loglikelihood"] = total
        return TaskResult([Metric("token_perplexity", ppl), Metric("bits_per_byte", bpb)], 1, info)
