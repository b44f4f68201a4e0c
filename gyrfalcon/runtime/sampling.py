"""Sampling parameters and the next-token choice for one row of logits."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch


class ParamError(ValueError):
    """A generation parameter out of range; the message names the field."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature == 0 means greedy (argmax); the other sampling knobs then do nothing.

    seed: makes sampling reproducible; every sequence gets its own generator seeded from it (sequence j of a
    prompt uses seed + j), so a sequence's tokens do not depend on what else is in the batch.
    stop: strings that end a sequence (the stop string itself is not part of the text).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    num_return_sequences: int = 1
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise ParamError(f"{name}={getattr(self, name)!r}: {what}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check("max_new_tokens", is_int(self.max_new_tokens) and 0 <= self.max_new_tokens <= 1_000_000,
              "must be an integer between 0 and 1,000,000")
        check("temperature", is_num(self.temperature) and 0 <= self.temperature <= 100, "must be in [0, 100]")
        check("top_k", is_int(self.top_k) and self.top_k >= 0, "must be an integer >= 0 (0 = off)")
        check("top_p", is_num(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]")
        check("repetition_penalty", is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 100,
              "must be in (0, 100]")
        check("seed", self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**63), "must be in [0, 2^63)")
        check("num_return_sequences", is_int(self.num_return_sequences) and 1 <= self.num_return_sequences <= 256,
              "must be an integer in [1, 256]")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        check("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        check("stop_token_ids", all(is_int(t) and t >= 0 for t in self.stop_token_ids), "must be token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device) -> tuple[torch.Generator, int]:
    """A per-sequence generator; with no seed one is drawn so the run can still be reported and repeated."""
    if seed is None:
        seed = secrets.randbits(63)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen, seed


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty as in transformers: seen tokens' positive logits are divided, negative multiplied."""
    if penalty == 1.0:
        return logits
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k and nucleus (top-p) filtering remove; always keeps the best token."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked before it already hold top_p of the mass.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                 generator: torch.Generator | None) -> int:
    """logits: [V] fp32 for one row. seen: [V] bool of tokens already in the sequence (for the penalty)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
