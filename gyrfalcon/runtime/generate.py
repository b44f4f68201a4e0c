"""The one generation loop: prefill, then one token per step for every live sequence.

`Generation` is an iterator of steps; each step is a list of `TokenEvent`s, one per sequence that produced a
token. The CLI, the Python API, evaluation and the benchmarks all drive this same loop. Text-level concerns
(detokenization, stop strings) live with the caller, which ends a sequence with `finish(index)`; the loop
itself only knows token ids.

Sequences: prompt i with `num_return_sequences = n` gives sequences i*n .. i*n+n-1. Finished sequences leave
the batch (their cache rows are dropped) before the next step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .sampling import SamplingParams, choose_token, make_generator


@dataclass
class TokenEvent:
    index: int  # sequence index
    token_id: int
    finished: bool = False
    finish_reason: str | None = None  # "eos" | "length" | "stop"


@dataclass
class _Seq:
    index: int
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator | None
    seed: int | None
    seen: torch.Tensor | None  # [V] bool, only when a repetition penalty is asked for
    tokens: list[int]
    finish_reason: str | None = None


class Generation:
    """Iterate to generate. `model` is any gyrfalcon causal LM (`forward(ids, cache, input_lengths, last_only)`
    and `new_cache`)."""

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
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        weight = next(model.parameters())
        self.device = weight.device
        self.vocab_size = model.config.vocab_size
        n = params.num_return_sequences
        self.seqs: list[_Seq] = []
        for i, p in enumerate(self.prompts):
            for j in range(n):
                gen, seed = (None, None) if params.greedy else make_generator(
                    None if params.seed is None else params.seed + j, self.device)
                seen = None
                if params.repetition_penalty != 1.0:
                    seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
                    seen[torch.tensor(p, device=self.device).clamp_(0, self.vocab_size - 1)] = True
                self.seqs.append(_Seq(i * n + j, len(p), params, gen, seed, seen, []))
        self._finish_requests: dict[int, str] = {}

    def finish(self, index: int, reason: str = "stop") -> None:
        """End sequence `index` before the next step (e.g. a stop string was seen, or the client went away)."""
        self._finish_requests[index] = reason

    @property
    def sequences(self) -> list[_Seq]:
        return self.seqs

    def _prefill(self) -> tuple[object, torch.Tensor]:
        lengths = [len(p) for p in self.prompts]
        longest = max(lengths)
        ids = torch.zeros(len(self.prompts), longest, dtype=torch.long)
        for r, p in enumerate(self.prompts):
            ids[r, : len(p)] = torch.tensor(p)
        cache = self.model.new_cache(len(self.prompts), longest + self.params.max_new_tokens)
        ragged = None if min(lengths) == longest else lengths
        logits = self.model(ids.to(self.device), cache, input_lengths=ragged, last_only=True)
        n = self.params.num_return_sequences
        if n > 1:  # fork each prompt's state into n sequences
            rows = [r for r in range(len(self.prompts)) for _ in range(n)]
            cache.select(rows)
            logits = logits[torch.tensor(rows, device=logits.device)]
        return cache, logits.float()

    def __iter__(self) -> Iterator[list[TokenEvent]]:
        if self.params.max_new_tokens == 0:
            for s in self.seqs:
                s.finish_reason = "length"
            return
        with torch.inference_mode():
            cache, logits = self._prefill()
            live = list(self.seqs)  # live[r] is the sequence in cache row r
            while live:
                events = []
                next_tokens = []
                for r, s in enumerate(live):
                    tok = choose_token(logits[r], s.params, s.seen, s.generator)
                    s.tokens.append(tok)
                    if s.seen is not None:
                        s.seen[tok] = True
                    if tok in self.stop_ids:
                        s.finish_reason = "eos"
                    elif len(s.tokens) >= s.params.max_new_tokens:
                        s.finish_reason = "length"
                    events.append(TokenEvent(s.index, tok, s.finish_reason is not None, s.finish_reason))
                    next_tokens.append(tok)
                yield events
                for s in live:  # the consumer may have ended sequences while handling the events
                    reason = self._finish_requests.pop(s.index, None)
                    if reason and s.finish_reason is None:
                        s.finish_reason = reason
                keep = [r for r, s in enumerate(live) if s.finish_reason is None]
                if not keep:
                    break
                if len(keep) < len(live):
                    cache.select(keep)
                    live = [live[r] for r in keep]
                    next_tokens = [next_tokens[r] for r in keep]
                ids = torch.tensor(next_tokens, dtype=torch.long, device=self.device)[:, None]
                logits = self.model(ids, cache, last_only=True).float()


def greedy_tokens(model: nn.Module, prompt: Sequence[int], n: int) -> list[int]:
    """n greedy tokens after `prompt` (no EOS stop): a small helper for tests and benchmarks."""
    gen = Generation(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0.0))
    for _ in gen:
        pass
    return gen.sequences[0].tokens
