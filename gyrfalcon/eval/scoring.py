"""Loglikelihood scoring: log p(continuation | context) for many (context, continuation) pairs, in fp32.

The conventions are lm-evaluation-harness's, so that the numbers equal its `HFLM`'s on the same weights:

* a context's trailing whitespace moves to the front of the continuation; the context and context + continuation
  are encoded separately, and the continuation's tokens are those of the joint encoding past the context's token
  count (`encode_pair`);
* an empty context becomes the end-of-text token (the "prefix token"), unless the continuation starts with it;
* a pair longer than max_length + 1 tokens loses tokens at the left of its context;
* each result is (sum of the continuation tokens' log-probabilities, whether every continuation token is the argmax).

How the work is cut down (same numbers, far fewer tokens through the model):

1. groups: requests that name the same `group` (an MMLU subject: the description and five dev examples; a
   WinoGrande item: its few-shot block) share a long token prefix. It runs once at batch 1, and its KV cache (or
   Mamba state) is forked for every context of the group.
2. contexts: every distinct context runs once however many continuations it has (the choices of an item share it),
   batched with right padding. Its last logits score the first token of each continuation, so a one-token
   continuation (MMLU's " A") costs nothing more.
3. continuations: tokens 1.. of each continuation run on a fork of their context's cache, batched (right-padded,
   longest first), and only their logits are read (`logit_budget` positions per forward bound the memory).

The model is any gyrfalcon causal LM: `forward(ids, cache, input_lengths=, last_only=)` and `new_cache`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from ..tokenizer import Tokenizer

# A group's common token prefix is run once only when it is at least this long; shorter ones are not worth a batch-1
# forward and the group's contexts join the ungrouped ones.
MIN_SHARED_PREFIX = 16
# lm-eval's default context length when the model names none.
DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Request:
    """One (context, continuation) pair as token ids. `group`: a hint that the requests of one group share a long
    prefix (it never changes the result, only the work)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]
    group: Hashable | None = None


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str,
                prefix_token_id: int | None) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into token ids (see the module docstring)."""
    return encode_pairs(tokenizer, [(context, continuation)], prefix_token_id)[0]


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]],
                 prefix_token_id: int | None) -> list[tuple[list[int], list[int]]]:
    """`encode_pair` for many pairs; each distinct context is encoded once, the rest in parallel batches."""
    moved: list[tuple[str, str]] = []
    for context, continuation in pairs:
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise TypeError("a loglikelihood request is a (context: str, continuation: str) pair")
        if context:
            n = len(context) - len(context.rstrip())
            if n:
                context, continuation = context[:-n], context[-n:] + continuation
            if not context:
                raise ValueError("a context made only of whitespace leaves nothing to condition on")
        moved.append((context, continuation))

    unique = sorted({c for c, _ in moved if c})
    ctx_ids = dict(zip(unique, tokenizer.encode_batch(unique), strict=True))
    joint = [i for i, (c, _) in enumerate(moved) if c]
    joint_ids = tokenizer.encode_batch([moved[i][0] + moved[i][1] for i in joint])
    out: list[tuple[list[int], list[int]] | None] = [None] * len(moved)
    for i, whole in zip(joint, joint_ids, strict=True):
        ctx = ctx_ids[moved[i][0]]
        out[i] = (ctx, whole[len(ctx):])
    for i, (c, cont) in enumerate(moved):
        if c:
            continue
        if prefix_token_id is None:
            raise ValueError("an empty context needs an end-of-text token to condition on; the tokenizer has none")
        ids = tokenizer.encode(cont, add_special_tokens=False)
        if not ids:
            raise ValueError("an empty continuation has no tokens to score")
        out[i] = ([prefix_token_id], ids) if ids[0] != prefix_token_id else (ids[:1], ids[1:])
    for (c, cont), enc in zip(pairs, out, strict=True):
        if not enc[1]:
            raise ValueError(f"the continuation {cont!r} (after context ...{c[-30:]!r}) has no tokens to score")
    return out  # type: ignore[return-value]


@dataclass
class _Context:
    tokens: tuple[int, ...]
    conts: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (request index, continuation)


@dataclass
class _Group:
    prefix: tuple[int, ...]  # run once, forked for every context (empty: no shared prefix)
    contexts: list[_Context]


@dataclass
class Plan:
    """What `Scorer.run` will compute. `tokens`: tokens through the model (a progress / ETA unit)."""

    groups: list[_Group]
    n_requests: int
    tokens: int


def _common_prefix(seqs: list[tuple[int, ...]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def _fork(cache, rows: list[int]):
    """A new cache holding `rows` of `cache` (which is left as it is)."""
    out = copy.copy(cache)
    out.select(rows)
    return out


def _right_pad(seqs: Sequence[Sequence[int]], width: int, device) -> torch.Tensor:
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids.to(device)


class Scorer:
    """Scores loglikelihood requests on a gyrfalcon model (see the module docstring).

    batch_size: contexts per forward (and continuation rows, up to 4x that when they are short);
    max_batch_tokens: bound on rows x length of one context batch; logit_budget: bound on the logit positions
    of one continuation forward (each is a vocab-sized fp32 row).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer | None, *, batch_size: int = 16,
                 max_length: int | None = None, max_batch_tokens: int = 8192, logit_budget: int = 1024):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
        self.max_batch_tokens = max_batch_tokens
        self.logit_budget = logit_budget
        self.device = next(model.parameters()).device

    @classmethod
    def for_llm(cls, llm, **kwargs) -> Scorer:
        kwargs.setdefault("max_length", llm.max_context)
        return cls(llm.model, llm.tokenizer, **kwargs)

    @property
    def prefix_token_id(self) -> int | None:
        """The token an empty context becomes: the end-of-text token, as lm-eval's `prefix_token_id`."""
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        return eos if eos is not None else getattr(self.model.config, "eos_token_id", None)

    # ------------------------------------------------------------------------------------------------------------
    # text in, numbers out

    def requests(self, pairs: Sequence[tuple[str, str]],
                 groups: Sequence[Hashable | None] | None = None) -> list[Request]:
        encoded = encode_pairs(self.tokenizer, pairs, self.prefix_token_id)
        groups = groups if groups is not None else [None] * len(encoded)
        return [Request(tuple(c), tuple(x), g) for (c, x), g in zip(encoded, groups, strict=True)]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], groups: Sequence[Hashable | None] | None = None,
                      progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), is_greedy) for each (context, continuation) string pair."""
        return self.run(self.plan(self.requests(pairs, groups)), progress)

    def loglikelihood_tokens(self, requests: Sequence[Request],
                             progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        return self.run(self.plan(requests), progress)

    # ------------------------------------------------------------------------------------------------------------
    # planning

    def _truncate(self, r: Request) -> tuple[int, ...]:
        ctx, cont = r.context, r.continuation
        if not cont:
            raise ValueError("a request with no continuation tokens has nothing to score")
        if not ctx:
            raise ValueError("a request needs at least one context token (use the prefix token for none)")
        if len(cont) > self.max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
        keep = self.max_length + 1 - len(cont)
        return ctx[-keep:] if len(ctx) > keep else ctx

    def plan(self, requests: Sequence[Request]) -> Plan:
        contexts: dict[tuple[int, ...], _Context] = {}
        group_of: dict[tuple[int, ...], Hashable | None] = {}
        for i, r in enumerate(requests):
            ctx = self._truncate(r)
            if ctx not in contexts:
                contexts[ctx] = _Context(ctx)
                group_of[ctx] = r.group
            contexts[ctx].conts.append((i, tuple(r.continuation)))

        by_group: dict[Hashable, list[_Context]] = {}
        loose: list[_Context] = []
        for ctx, c in contexts.items():
            g = group_of[ctx]
            (loose if g is None else by_group.setdefault(g, [])).append(c)
        groups: list[_Group] = []
        for members in by_group.values():
            p = 0
            if len(members) > 1:
                p = min(_common_prefix([m.tokens for m in members]), min(len(m.tokens) for m in members) - 1)
            if p < MIN_SHARED_PREFIX:
                loose.extend(members)
                continue
            groups.append(_Group(members[0].tokens[:p], members))
        if loose:
            groups.append(_Group((), loose))
        tokens = 0
        for g in groups:
            g.contexts.sort(key=lambda c: (-len(c.tokens), c.tokens))
            tokens += len(g.prefix) + sum(len(c.tokens) - len(g.prefix) for c in g.contexts)
            tokens += sum(len(x) - 1 for c in g.contexts for _, x in c.conts)
        return Plan(groups, len(requests), tokens)

    # ------------------------------------------------------------------------------------------------------------
    # running

    def run(self, plan: Plan, progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        sums = [0.0] * plan.n_requests
        greedy = [True] * plan.n_requests
        tick = progress or (lambda n: None)
        with torch.inference_mode():
            for g in plan.groups:
                self._run_group(g, sums, greedy, tick)
        return list(zip(sums, greedy, strict=True))

    def _run_group(self, g: _Group, sums: list[float], greedy: list[bool], tick) -> None:
        p = len(g.prefix)
        longest_cont = max(len(x) for c in g.contexts for _, x in c.conts)
        prefix_cache = None
        if p:
            cap = max(len(c.tokens) for c in g.contexts) + longest_cont
            prefix_cache = self.model.new_cache(1, cap)
            self.model(_right_pad([g.prefix], p, self.device), prefix_cache, last_only=True)
            tick(p)
        i = 0
        while i < len(g.contexts):
            longest = len(g.contexts[i].tokens) - p  # contexts are sorted longest first
            rows = max(1, min(self.batch_size, self.max_batch_tokens // max(longest, 1)))
            batch = g.contexts[i : i + rows]
            i += rows
            suffixes = [c.tokens[p:] for c in batch]
            lens = [len(s) for s in suffixes]
            cont_max = max(len(x) for c in batch for _, x in c.conts)
            if prefix_cache is not None:
                cache = _fork(prefix_cache, [0] * len(batch))
            else:
                cache = self.model.new_cache(len(batch), longest + cont_max)
            ragged = None if min(lens) == longest else lens
            last = self.model(_right_pad(suffixes, longest, self.device), cache, input_lengths=ragged,
                              last_only=True).float()  # [b, V]
            tick(sum(lens))
            self._score_first_tokens(batch, last, sums, greedy)
            rest = [(row, idx, x) for row, c in enumerate(batch) for idx, x in c.conts if len(x) > 1]
            if rest:
                rest.sort(key=lambda t: -len(t[2]))
                self._score_rest(cache, rest, sums, greedy, tick)

    @staticmethod
    def _score_first_tokens(batch: list[_Context], last: torch.Tensor, sums, greedy) -> None:
        rows, toks, idxs = [], [], []
        for row, c in enumerate(batch):
            for idx, x in c.conts:
                rows.append(row)
                toks.append(x[0])
                idxs.append(idx)
        lse = torch.logsumexp(last, dim=-1)
        best = last.argmax(dim=-1)
        r = torch.tensor(rows, device=last.device)
        t = torch.tensor(toks, device=last.device)
        lp = (last[r, t] - lse[r]).tolist()
        hit = (best[r] == t).tolist()
        for idx, v, h in zip(idxs, lp, hit, strict=True):
            sums[idx] += v
            greedy[idx] = greedy[idx] and h

    def _score_rest(self, cache, rest: list[tuple[int, int, tuple[int, ...]]], sums, greedy, tick) -> None:
        """Tokens 1.. of each continuation: input x[:-1] on a fork of its context's row, targets x[1:]."""
        j = 0
        while j < len(rest):
            width = len(rest[j][2]) - 1
            rows = max(1, min(4 * self.batch_size, self.logit_budget // width))
            chunk = rest[j : j + rows]
            j += rows
            sub = _fork(cache, [row for row, _, _ in chunk])
            inputs = [x[:-1] for _, _, x in chunk]
            targets = [x[1:] for _, _, x in chunk]
            step = max(1, self.logit_budget // len(chunk))  # time slices, for very long continuations
            for t0 in range(0, width, step):
                t1 = min(width, t0 + step)
                n = [max(0, min(len(s), t1) - t0) for s in inputs]
                ids = _right_pad([s[t0:t1] for s in inputs], t1 - t0, self.device)
                ragged = None if min(n) == t1 - t0 else n
                logits = self.model(ids, sub, input_lengths=ragged).float()  # [r, t, V]
                tick(sum(n))
                tgt = _right_pad([s[t0:t1] for s in targets], t1 - t0, self.device)
                steps = torch.arange(t1 - t0, device=self.device)[None, :]
                valid = steps < torch.tensor(n, device=self.device)[:, None]
                lp = logits.gather(-1, tgt[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
                hit = (logits.argmax(dim=-1) == tgt) | ~valid
                lp_sum = torch.where(valid, lp, torch.zeros((), device=lp.device)).sum(-1).tolist()
                all_hit = hit.all(-1).tolist()
                for (_, idx, _), v, h in zip(chunk, lp_sum, all_hit, strict=True):
                    sums[idx] += v
                    greedy[idx] = greedy[idx] and h
