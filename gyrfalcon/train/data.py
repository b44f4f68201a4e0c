"""Text -> token ids -> training and evaluation batches.

The whole file is tokenized once, a chunk of lines at a time (so peak memory is one chunk of text plus the id
array, never a Python list of every id), into one flat int32 tensor. The held-out split is the last fraction of
that tensor: deterministic, and never overlapping the training windows.

Training draws random windows of `seq_len + 1` tokens (inputs and shifted targets) with a private, seeded
generator whose state is checkpointed, so a resumed run draws exactly the batches an uninterrupted one would.
Evaluation reads fixed consecutive windows, so every eval of a run (and of every run) scores the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# Characters of text handed to the tokenizer at once. Chunks end at a line break where byte-level BPE
# pre-tokenization splits anyway, so the ids equal those of encoding the whole file in one call.
CHUNK_CHARS = 1 << 20


def iter_text_chunks(path: str | Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """The file's text in pieces of about `chunk_chars` characters, each ending at a line break (but the last)."""
    path = Path(path)
    buf: list[str] = []
    size = 0
    with path.open("r", encoding="utf-8", newline="") as f:  # newline="": keep the file's bytes as they are
        for line in f:
            # Cut only between a non-blank line and a line starting with a non-space: a lone "\n" between two
            # words is its own pre-token in byte-level BPE either way, whereas a run of whitespace cut in two
            # would be split differently.
            if size >= chunk_chars and line[:1].strip() and buf[-1].strip():
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
    if buf:
        yield "".join(buf)


def tokenize_file(path: str | Path, encode: Callable[[str], list[int]], chunk_chars: int = CHUNK_CHARS) -> torch.Tensor:
    """Token ids of the whole file as one int32 tensor [N]."""
    parts = [torch.tensor(encode(chunk), dtype=torch.int32) for chunk in iter_text_chunks(path, chunk_chars)]
    if not parts:
        return torch.zeros(0, dtype=torch.int32)
    return torch.cat(parts)


def split_tokens(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the held-out part is the last `val_fraction` of the tokens."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


class RandomWindows:
    """An endless, seeded stream of [batch_size, seq_len + 1] int64 batches of random windows of `tokens`.

    Checkpointable: `state_dict()` holds the generator state and the number of batches drawn, and
    `load_state_dict` continues the stream exactly where it was.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} training tokens are fewer than one window of seq_len+1={seq_len + 1}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        self._offsets = torch.arange(seq_len + 1)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        high = len(self.tokens) - self.seq_len  # a start at high-1 still fits seq_len+1 tokens
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        self.batches_drawn += 1
        return self.tokens[starts[:, None] + self._offsets].long()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batches_drawn": self.batches_drawn, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's sampler was seeded with {state['seed']}, this one with {self.seed}")
        self.generator.set_state(state["generator"])
        self.batches_drawn = state["batches_drawn"]


def eval_windows(tokens: torch.Tensor, seq_len: int, batch_size: int, max_batches: int | None = None
                 ) -> list[torch.Tensor]:
    """Consecutive windows of seq_len+1 tokens (each overlapping the next by one, so every token is a target
    once), grouped into int64 batches of at most `batch_size`; at most `max_batches` batches."""
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        return []
    starts = torch.arange(n_windows) * seq_len
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()
    return list(windows.split(batch_size))
