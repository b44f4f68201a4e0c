"""Generate for a fixed batch of prompts: the offline face of the one engine (runtime/engine.py).

`Generation` is an iterator of steps; each step is a list of `TokenEvent`s, one per sequence that produced a
token, in sequence order. The CLI, the Python API, evaluation and the benchmarks drive it; the server drives the
same `Engine` with requests that come and go. Text-level concerns (detokenization, stop strings) live with the
caller, which ends a sequence with `finish(index)`; the loop itself only knows token ids.

Sequences: prompt i with `num_return_sequences = n` gives sequences i*n .. i*n+n-1 (sequence j of a prompt is
seeded with seed + j). The engine's pool is sized to hold the whole batch, and its token budget is unlimited, so
the first step prefills every prompt and each later step advances every live sequence by one token; samples j > 0
of a prompt longer than a KV block start one step later, because they borrow sample 0's cached prompt instead of
computing it again. Finished sequences leave the batch (their blocks are freed) before the next step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import nn

from .engine import Engine, SeqState, TokenEvent
from .sampling import SamplingParams

__all__ = ["Generation", "TokenEvent", "greedy_tokens"]

_Seq = SeqState  # the name this module used before the engine existed


class Generation:
    """Iterate to generate. `model` is any gyrfalcon causal LM (`forward(ids, cache, input_lengths, last_only)`
    and a `config`)."""

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        eos_token_ids: Sequence[int] = (),
        max_context: int | None = None,
    ):
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: at least one token is needed to start from")
            if max_context is not None and len(p) + params.max_new_tokens > max_context:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} that exceeds the "
                    f"model's context of {max_context} tokens"
                )
        self.model = model
        self.prompts = [list(p) for p in prompts]
        self.params = params
        n = params.num_return_sequences
        lengths = [len(p) + max(1, params.max_new_tokens) for p in self.prompts for _ in range(n)]
        self.engine = Engine.for_batch(model, eos_token_ids, lengths)
        self.seqs: list[SeqState] = []
        for i, p in enumerate(self.prompts):
            for j in range(n):
                seed = None if params.seed is None else params.seed + j
                # Samples j > 0 borrow sample 0's cached prompt (computed once).
                self.seqs.append(self.engine.add(i * n + j, p, params, seed, same_prompt_as=i * n if j else None))

    def finish(self, index: int, reason: str = "stop") -> None:
        """End sequence `index` before the next step (e.g. a stop string was seen, or the client went away)."""
        self.engine.finish(index, reason)

    @property
    def sequences(self) -> list[SeqState]:
        return self.seqs

    def __iter__(self) -> Iterator[list[TokenEvent]]:
        if self.params.max_new_tokens == 0:
            for s in self.seqs:
                s.finish_reason = "length"
            return
        while self.engine.has_unfinished():
            events = self.engine.step()
            if events:
                events.sort(key=lambda e: e.index)
                yield events


def greedy_tokens(model: nn.Module, prompt: Sequence[int], n: int) -> list[int]:
    """n greedy tokens after `prompt` (no EOS stop): a small helper for tests and benchmarks."""
    gen = Generation(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0.0))
    for _ in gen:
        pass
    return gen.sequences[0].tokens
