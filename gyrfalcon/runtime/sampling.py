"""Sampling parameters and the next-token choice: `choose_token` for one row of logits (the reference) and
`choose_tokens` for a batch of rows (what the engine runs).

Both make the same choice for a row, bit for bit: the batched path runs the same per-row operations, only
batched where a batched kernel gives every row exactly the result the row alone gets (argmax, softmax and
cumsum along the last dim, topk), and draws each sampled row's token with that row's own generator from that
row's own probabilities. What it saves is the full vocabulary sort of top-p: it looks at the best
`TOP_P_CANDIDATES` tokens (one batched topk) and sorts everything only for the rows whose nucleus is not
settled inside them (see `_top_p_drop`), on CPU with a radix sort in C that gives the reference's mask bit for bit
(kernels/sampling_cpu.c; 16 rows of 65,024 tokens: ~5 ms against torch.sort's ~45 ms).

The draw is the exponential race torch.multinomial runs for one sample, argmax(p / q) with q ~ Exp(1) per token,
with q = -log(u) from uniform numbers (u ~ U[0, 1) from the row's generator): torch's CPU `exponential_` takes
~1.2 ms for 65,024 numbers here, `uniform_` ~0.19 ms. A race, not inverse-CDF sampling (one uniform number per row,
tried first): the token a race picks changes only if two scores p / q are within rounding of each other, while an
inverse-CDF pick moves whenever the cumulative sum at u shifts by a rounding error, which made batched and alone
runs (whose logits differ in the last bits) pick different tokens every few hundred draws.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)


class ParamError(ValueError):
    """A generation parameter out of range; the message names the field."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature == 0 means greedy (argmax); the other sampling knobs then do nothing.

    seed: makes sampling reproducible; every sequence gets its own generator seeded from it (sequence j of a
    prompt uses seed + j), so a sequence's tokens do not depend on what else is in the batch.
    stop: strings that end a sequence (the stop string itself is not part of the text).
    logprobs: None, or report each generated token's log-probability and this many of the most likely
    alternatives (0: the token's own only). They are those of the model's distribution (log-softmax of its
    logits), before the repetition penalty, temperature and top-k / top-p shape the choice.
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
    logprobs: int | None = None
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
        check("logprobs", self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
              f"must be None or an integer in [0, {MAX_LOGPROBS}]")
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


# Top-p looks at this many best tokens first; a row whose nucleus is not settled among them is sorted in full.
TOP_P_CANDIDATES = 256


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k and nucleus (top-p) filtering remove from one row; always keeps the best token.

    Nucleus: rank the tokens by logit (ties by token id, a stable sort) and drop a token when the tokens ranked
    before it already hold top_p of the probability mass. The probabilities are those of the whole row in
    token order, so they do not depend on how the row was sorted."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs = logits.softmax(-1)
        order = torch.sort(logits, descending=True, stable=True).indices
        sorted_probs = probs[order]
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _top_p_drop(logits: torch.Tensor, top_p: Sequence[float], candidates: int = TOP_P_CANDIDATES) -> torch.Tensor:
    """[B, V] bool: what `filter_top_k_top_p`'s nucleus step drops from each row, without sorting whole rows.

    The best `candidates` tokens of every row come from one topk. A row is settled by them when the mass before
    the last candidate already reaches top_p: every token ranked after it has a probability no larger and a
    cumulative sum no smaller, so it is dropped too (cumsum accumulates in order, so the candidates' prefix sums
    are the sorted row's own). Tokens with equal logits have equal probabilities, so the order topk gives ties
    matters only where the cut falls between two of them; such a row, and an unsettled one, is sorted in full
    like the reference."""
    n, vocab = logits.shape
    probs = logits.softmax(-1)
    drop = torch.zeros(n, vocab, dtype=torch.bool, device=logits.device)
    k = min(candidates, vocab)
    vals, order = torch.topk(logits, k, dim=-1)
    sorted_probs = probs.gather(-1, order)
    before = sorted_probs.cumsum(-1) - sorted_probs
    full: list[int] = []
    for r, p in enumerate(top_p):
        d = before[r] >= p  # the reference's comparison, with the same Python float
        d[0] = False
        ties = vals[r, 1:] == vals[r, :-1]
        settled = k == vocab or (k > 1 and bool(d[-1]))
        if settled and not bool((ties & (d[1:] != d[:-1])).any()):
            drop[r] = True
            drop[r].scatter_(0, order[r], d)
        else:
            full.append(r)
    if full and _kernel_ok(logits):
        from ..kernels import cpu

        rows = torch.tensor(full)
        drop[rows] = cpu.top_p_drop(logits[rows].contiguous(), probs[rows].contiguous(), [top_p[r] for r in full])
    elif full:
        rows = torch.tensor(full, device=logits.device)
        sub_order = torch.sort(logits[rows], dim=-1, descending=True, stable=True).indices
        sub_probs = probs[rows].gather(-1, sub_order)
        sub_before = sub_probs.cumsum(-1) - sub_probs
        for i, r in enumerate(full):
            d = sub_before[i] >= top_p[r]
            d[0] = False
            drop[r] = torch.zeros_like(d).scatter(0, sub_order[i], d)
    return drop


USE_KERNEL = True  # False: unsettled top-p rows are sorted with torch.sort (the reference), for comparisons


def _kernel_ok(logits: torch.Tensor) -> bool:
    if not (USE_KERNEL and logits.device.type == "cpu" and logits.dtype == torch.float32):
        return False
    from ..kernels import cpu

    return cpu.available()


def filter_top_k_top_p_rows(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """`filter_top_k_top_p` for every row of logits [B, V] with its own top_k and top_p: one topk for the
    top-k rows and one for the top-p rows (see `_top_p_drop`)."""
    n, vocab = logits.shape
    k_rows = [r for r in range(n) if top_k[r] and top_k[r] < vocab]
    if k_rows:
        rows = torch.tensor(k_rows, device=logits.device)
        best = torch.topk(logits[rows], max(top_k[r] for r in k_rows), dim=-1).values
        # The k-th largest value of a row does not depend on how topk orders ties.
        kth = best.gather(-1, torch.tensor([[top_k[r] - 1] for r in k_rows], device=logits.device))
        logits = logits.clone()
        logits[rows] = logits[rows].masked_fill(logits[rows] < kth, float("-inf"))
    p_rows = [r for r in range(n) if top_p[r] < 1.0]
    if p_rows:
        rows = torch.tensor(p_rows, device=logits.device)
        drop = _top_p_drop(logits[rows], [top_p[r] for r in p_rows])
        logits = logits.clone() if not k_rows else logits
        logits[rows] = logits[rows].masked_fill(drop, float("-inf"))
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
    return draw_one(probs, generator)


def _check_probs(probs: torch.Tensor) -> None:
    """What torch.multinomial refuses: negative or non-finite entries, or a row [.., V] with no mass."""
    if bool((probs < 0).any()) or not bool(torch.isfinite(probs).all()):
        raise ValueError("probabilities must be finite and non-negative")
    if not bool((probs.sum(-1) > 0).all()):
        raise ValueError("probabilities sum to zero")


def draw_one(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """A token from probs [V] (non-negative, finite, not all zero): argmax(probs / q), q = -log(u) with V uniform
    numbers u in [0, 1) from `generator` (an exponential race: token t wins with probability probs[t] / sum)."""
    _check_probs(probs)
    # fp32 numbers whatever the dtype of probs: in bf16, u would take only 256 values and q = -log(u) would be coarse
    u = torch.rand(probs.shape[-1], generator=generator, device=probs.device, dtype=torch.float32)
    return int((probs.float() / u.log().neg_()).argmax())


def choose_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], seen: Sequence[torch.Tensor | None],
                  generators: Sequence[torch.Generator | None]) -> list[int]:
    """`choose_token` for every row of logits [B, V] (fp32) with its own parameters, seen-mask and generator,
    giving the same tokens. Greedy rows take one batched argmax; sampled rows share the top-k / top-p work
    (filter_top_k_top_p_rows) and one softmax, then each draws with its own generator from its own row."""
    n = logits.shape[0]
    if not (len(params) == len(seen) == len(generators) == n):
        raise ValueError(f"{n} rows of logits but {len(params)} params, {len(seen)} masks, {len(generators)} "
                         "generators")
    penalized = [r for r in range(n) if seen[r] is not None and params[r].repetition_penalty != 1.0]
    if penalized:
        logits = logits.clone()
        for r in penalized:
            logits[r] = apply_repetition_penalty(logits[r], seen[r], params[r].repetition_penalty)
    out = [0] * n
    greedy = [r for r in range(n) if params[r].greedy]
    if greedy:
        best = logits[torch.tensor(greedy, device=logits.device)].argmax(-1).tolist()
        for r, t in zip(greedy, best, strict=True):
            out[r] = t
    sampled = [r for r in range(n) if not params[r].greedy]
    if sampled:
        # Row by row, as choose_token divides: a cheap elementwise op, and the same rounding by construction.
        scaled = torch.stack([logits[r] / params[r].temperature for r in sampled])
        scaled = filter_top_k_top_p_rows(scaled, [params[r].top_k for r in sampled],
                                         [params[r].top_p for r in sampled])
        probs = torch.softmax(scaled, dim=-1)
        draws = _draw(probs, [generators[r] for r in sampled])
        for r, t in zip(sampled, draws, strict=True):
            out[r] = t
    return out


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> list[int]:
    """`draw_one` for every row of probs [B, V], each with its own generator: the uniform numbers row by row (each
    from its own generator), the log, division and argmax batched; they are elementwise (or per row), so every row
    gets exactly `draw_one`'s token."""
    _check_probs(probs)
    vocab = probs.shape[-1]
    u = torch.stack([torch.rand(vocab, generator=g, device=probs.device, dtype=torch.float32) for g in generators])
    return (probs.float() / u.log_().neg_()).argmax(-1).tolist()


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int],
                   top: Sequence[int]) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each row of logits [B, V]: (log p(tokens[r]), the top[r] most likely (token, log p), best first) under
    the model's distribution (log-softmax of the raw logits). One log-softmax and one topk for the batch."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    k = max(top, default=0)
    best_v, best_i = (torch.topk(logp, k, dim=-1) if k else (None, None))
    out = []
    for r, lp in enumerate(picked):
        alts = []
        if top[r]:
            alts = list(zip(best_i[r, : top[r]].tolist(), best_v[r, : top[r]].tolist(), strict=True))
        out.append((lp, alts))
    return out
