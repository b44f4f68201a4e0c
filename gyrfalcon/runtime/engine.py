"""The engine: one step of continuous batching, `schedule() -> run() -> sample()`, over a paged cache.

This is the one generation loop of gyrfalcon. `Generation` (runtime/generate.py: the CLI, the Python API,
evaluation, the benchmarks) drives it with a pool sized to hold its whole batch and an unlimited token budget,
so every step advances every sequence by one token; the server (gyrfalcon/server) drives it with a fixed pool
(--kv-cache-bytes), a token budget and requests that come and go. The per-token rules live here only: the
token choice (sampling.choose_tokens, batched, equal to choose_token row by row, with a per-sequence generator
seeded from the request's seed, + j for the j-th of n), the repetition-penalty mask, and the finish reasons
(eos, length, or stop/cancel on request).

A step:
    1. the scheduler (plain Python, scheduler.py) picks (sequence, n tokens) pairs within the budget and
       memory, preempting if it must;
    2. the model runs them as forward passes over views of the pool (kv_pool.py): one for the rows with one new
       token (decode), and the rows with several (prefill chunks, right-padded) in passes of similar widths
       (`prefill_groups`);
    3. every sequence whose tokens are now all computed samples its next token; a `TokenEvent` reports it.

A sequence's tokens never depend on what else is in the batch: its cache rows are its own, its generator is its
own, and sampling reads only its own logits row.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from torch import nn

from ..config import FalconMambaConfig
from .kv_pool import PagedKVPool, StateSlots
from .sampling import SamplingParams, choose_tokens, make_generator, token_logprobs
from .scheduler import BlockManager, Scheduler, SchedulerOutput, Sequence

UNLIMITED = 1 << 62


@dataclass
class TokenEvent:
    index: int  # sequence id
    token_id: int
    finished: bool = False
    finish_reason: str | None = None  # "eos" | "length" | "stop" (or the reason given to `finish`)
    logprob: float | None = None  # with SamplingParams.logprobs: log p(token) under the model
    top_logprobs: list[tuple[int, float]] | None = None  # the SamplingParams.logprobs most likely (id, log p)


@dataclass(eq=False)
class SeqState:
    """A sequence as the engine sees it: its sampling state on top of the scheduler's token bookkeeping."""

    index: int
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator | None
    seed: int | None
    seen: torch.Tensor | None  # [V] bool, only when a repetition penalty is asked for
    tokens: list[int]  # generated ids (the scheduler's output_ids: one list)
    stop_ids: frozenset[int] = frozenset()
    finish_reason: str | None = None
    sched: Sequence | None = None


@dataclass
class EngineConfig:
    """num_blocks: KV blocks of `block_size` token slots (Falcon) or state slots (Falcon-Mamba)."""

    num_blocks: int
    block_size: int = 16
    max_batch_size: int = 32
    max_batch_tokens: int = 512
    watermark_blocks: int | None = None


# A prefill pass right-pads its rows to the longest; a row joins a pass only if that pads it by at most this many
# tokens, else it starts a pass of its own. A pass re-reads every weight (for a 250M fp32 model ~30 ms on 2 cores,
# the compute of ~17 prompt tokens), while padding a 7-token prompt to a 480-token neighbour computed 473 tokens for
# nothing: a server workload of mixed prompt lengths (benchmarks/serve_load.py) padded its prefill passes by 38%.
PREFILL_PAD_SLACK = 32


def prefill_groups(rows: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
    """Split the prefill rows of a step into passes of similar widths (see PREFILL_PAD_SLACK), longest first."""
    groups: list[list[tuple[Sequence, int]]] = []
    for row in sorted(rows, key=lambda r: -r[1]):
        if groups and groups[-1][0][1] - row[1] <= PREFILL_PAD_SLACK:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def is_state_space(model: nn.Module) -> bool:
    return isinstance(model.config, FalconMambaConfig)


def cache_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype the model keeps its cache (that of its embeddings: a quantized model's first
    parameter may be an int8 weight)."""
    probe = model.new_cache(1, 1)
    t = probe.conv[0] if is_state_space(model) else probe.k[0]
    return t.device, t.dtype


def cache_block_bytes(model: nn.Module, block_size: int, dtype: torch.dtype | None = None) -> int:
    """Bytes of one block: block_size tokens of K and V over all layers (Falcon), or one sequence's state."""
    c = model.config
    dtype = dtype or cache_dtype(model)[1]
    if is_state_space(model):
        return StateSlots.slot_bytes(c.num_layers, c.intermediate_size, c.state_size, c.conv_kernel, dtype)
    return PagedKVPool.block_bytes(c.num_layers, block_size, c.num_kv_heads, c.head_dim, dtype)


class Engine:
    """Continuous batching over one model. Not thread-safe: one thread calls `add`, `finish` and `step`."""

    def __init__(self, model: nn.Module, eos_token_ids: Seq[int], config: EngineConfig):
        self.model = model
        self.config = config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device, self.dtype = cache_dtype(model)
        self.vocab_size = model.config.vocab_size
        c = model.config
        self.state_space = is_state_space(model)
        if self.state_space:
            self.blocks = BlockManager(config.num_blocks, None)
            self.pool = StateSlots(c.num_layers, config.num_blocks, c.intermediate_size, c.state_size,
                                   c.conv_kernel, self.dtype, self.device)
        else:
            self.blocks = BlockManager(config.num_blocks, config.block_size)
            self.pool = PagedKVPool(c.num_layers, config.num_blocks, config.block_size, c.num_kv_heads, c.head_dim,
                                    self.dtype, self.device)
        self.scheduler = Scheduler(self.blocks, config.max_batch_size, config.max_batch_tokens,
                                   config.watermark_blocks)
        self.states: dict[int, SeqState] = {}
        self._pending_finish: dict[int, str] = {}
        self.last_output = SchedulerOutput()

    @classmethod
    def for_batch(cls, model: nn.Module, eos_token_ids: Seq[int], lengths: Seq[int], block_size: int = 16) -> Engine:
        """An engine sized to hold sequences of these final lengths all at once: no preemption, no budget."""
        ss = is_state_space(model)
        bs = None if ss else block_size
        blocks = sum(1 if bs is None else -(-n // bs) for n in lengths)
        return cls(model, eos_token_ids, EngineConfig(num_blocks=max(1, blocks), block_size=block_size,
                                                      max_batch_size=max(1, len(lengths)), max_batch_tokens=UNLIMITED,
                                                      watermark_blocks=0))

    # ---- sequences -------------------------------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int | None:
        """The longest sequence (prompt + new tokens) the pool can hold; None: unbounded (a state)."""
        return self.blocks.capacity_tokens

    def add(self, seq_id: int, prompt: Seq[int], params: SamplingParams, seed: int | None = None,
            same_prompt_as: int | None = None) -> SeqState:
        """Queue a sequence. `seed` is this sequence's own seed (the request's seed + j for its j-th sample).
        same_prompt_as: a sequence added before with the same prompt (sample 0 of the request), whose cached prompt
        this one borrows instead of computing it again."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError(f"sequence {seq_id}: the prompt is empty: at least one token is needed to start from")
        gen, seed = (None, None) if params.greedy else make_generator(seed, self.device)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            seen[torch.tensor(prompt, device=self.device).clamp_(0, self.vocab_size - 1)] = True
        sched = Sequence(seq_id, prompt)
        source = self.states.get(same_prompt_as) if same_prompt_as is not None else None
        if source is not None and source.sched.prompt_ids == prompt:
            sched.prompt_source = source.sched
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        state = SeqState(seq_id, len(prompt), params, gen, seed, seen, sched.output_ids, stop_ids, sched=sched)
        self.scheduler.add(sched)
        self.states[seq_id] = state
        return state

    def finish(self, seq_id: int, reason: str = "stop") -> None:
        """End a sequence before the next step (a stop string was seen, the client went away...)."""
        if seq_id in self.states:
            self._pending_finish[seq_id] = reason

    def has_unfinished(self) -> bool:
        self._apply_pending()
        return self.scheduler.has_unfinished()

    def _apply_pending(self) -> None:
        while self._pending_finish:
            seq_id, reason = self._pending_finish.popitem()
            state = self.states.pop(seq_id, None)
            if state is not None and state.finish_reason is None:
                state.finish_reason = reason
            self.scheduler.finish(seq_id)

    def _retire(self, state: SeqState) -> None:
        self.states.pop(state.index, None)
        self.scheduler.finish(state.index)

    # ---- one step --------------------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Run one step; return the token of every sequence that produced one, in schedule order."""
        self._apply_pending()
        out = self.scheduler.schedule()
        self.last_output = out
        if not out:
            return []
        with torch.inference_mode():
            logits: dict[int, torch.Tensor] = {}
            argmax: dict[int, int] = {}
            decode = [(s, n) for s, n in out.scheduled if n == 1]
            prefill = [(s, n) for s, n in out.scheduled if n > 1]
            for rows in [decode, *prefill_groups(prefill)]:
                if rows:
                    last = self._forward(rows)
                    for r, (s, _) in enumerate(rows):
                        logits[s.seq_id] = last[r]
                    if any(self.states[s.seq_id].params.greedy for s, _ in rows):
                        # One argmax for the pass: the same choice choose_tokens makes for a greedy row.
                        argmax.update(zip((s.seq_id for s, _ in rows), last.argmax(-1).tolist(), strict=True))
            ready = self.scheduler.commit(out)
            return self._sample([self.states[s.seq_id] for s in ready], logits, argmax)

    def _forward(self, rows: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute each row's next n tokens; return fp32 logits [B, V] at each row's last one."""
        width = max(n for _, n in rows)
        counts = [n for _, n in rows]
        starts = [s.num_computed for s, _ in rows]
        ids = [s.token_slice(s.num_computed, s.num_computed + n) + [0] * (width - n) for s, n in rows]
        ids_t = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
        ragged = None if min(counts) == width else counts
        tables = [self.blocks.tables[s.seq_id] for s, _ in rows]
        if self.state_space:
            slots = [t[0] for t in tables]
            cache = self.pool.gather(slots, starts)
            out = self.model(ids_t, cache, input_lengths=ragged, last_only=True)
            self.pool.scatter(slots, cache)
        else:
            view = self.pool.view(tables, starts, counts, width)
            out = self.model(ids_t, view, input_lengths=ragged, last_only=True)
        return out.float()

    def _sample(self, states: list[SeqState], logits: dict[int, torch.Tensor],
                argmax: dict[int, int]) -> list[TokenEvent]:
        events = []
        # Every row that is not plain greedy is chosen in one batched call (one topk for all top-p rows...).
        need = [s for s in states if not (s.params.greedy and s.seen is None)]
        chosen = {}
        if need:
            toks = choose_tokens(torch.stack([logits[s.index] for s in need]), [s.params for s in need],
                                 [s.seen for s in need], [s.generator for s in need])
            chosen = dict(zip((s.index for s in need), toks, strict=True))
        toks = [chosen[s.index] if s.index in chosen else argmax[s.index] for s in states]
        scored = [(s, t) for s, t in zip(states, toks, strict=True) if s.params.logprobs is not None]
        logprobs = {}
        if scored:
            logprobs = dict(zip((s.index for s, _ in scored), token_logprobs(
                torch.stack([logits[s.index] for s, _ in scored]), [t for _, t in scored],
                [s.params.logprobs for s, _ in scored]), strict=True))
        for s, tok in zip(states, toks, strict=True):
            s.tokens.append(tok)
            if s.seen is not None:
                s.seen[tok] = True
            if tok in s.stop_ids:
                s.finish_reason = "eos"
            elif len(s.tokens) >= s.params.max_new_tokens:
                s.finish_reason = "length"
            elif self.capacity_tokens is not None and s.sched.num_tokens >= self.capacity_tokens:
                s.finish_reason = "length"  # the pool cannot hold one more token for this sequence
            ev = TokenEvent(s.index, tok, s.finish_reason is not None, s.finish_reason)
            if s.index in logprobs:
                ev.logprob, ev.top_logprobs = logprobs[s.index]
            events.append(ev)
            if s.finish_reason is not None:
                self._retire(s)
        return events

    # ---- numbers for metrics -----------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def blocks_used(self) -> int:
        return self.blocks.num_used

    @property
    def blocks_free(self) -> int:
        return self.blocks.num_free
