"""Continuous-batching scheduler and KV block manager, in plain Python (no torch).

Every engine step is `schedule() -> run the model -> commit()`. The scheduler decides, for the step, which
sequences compute how many of their tokens; the engine runs them and samples; the scheduler then advances
the sequences. It never sees a tensor, so it is unit-tested with a fake model runner (tests/test_scheduler.py).

Vocabulary
    tokens        a sequence's prompt ids followed by the ids generated so far
    num_computed  how many of its tokens have their keys/values (or state) in the cache
    uncomputed    tokens - num_computed: the whole prompt for a new sequence, 1 (the last sampled token)
                  for a decoding one, prompt + output for one that was preempted and is being recomputed
    sample        a sequence samples its next token in the step where num_computed reaches len(tokens)

One step, with a budget of `max_batch_tokens` new tokens:
    1. running sequences that decode (1 token each), oldest first; one that needs a new block and finds none
       preempts the newest running sequence (possibly itself), which frees its blocks and goes back to the
       front of the waiting queue to be recomputed later (its tokens so far are kept: nothing is lost, and
       nothing is sampled twice);
    2. running sequences in the middle of a chunked prefill, oldest first, each with as many tokens as the
       budget (and free memory) allows: a long prompt advances a chunk per step and never stalls the streams;
    3. waiting sequences in arrival order (no overtaking: first come, first served), while the budget, the
       batch size and memory allow, and only in a step that preempted nobody.

Memory: `BlockManager` hands out fixed-size blocks of `block_size` token slots from a pool of `num_blocks`;
a sequence holds ceil(num_computed / block_size) of them. For a state-space model (Falcon-Mamba) the state
does not grow: `block_size=None` gives every sequence exactly one block, its state slot.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """What the scheduler knows of a sequence: its token ids and how far the cache has got."""

    seq_id: int
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    arrival: int = 0  # priority: lower is older; set by the scheduler
    num_preemptions: int = 0
    # Another sequence with the same prompt (sample j > 0 of a request): this one borrows its full prompt blocks
    # instead of computing them again.
    prompt_source: Sequence | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Token ids [start, stop) of prompt + output, without building the concatenation."""
        p = len(self.prompt_ids)
        if stop <= p:
            return self.prompt_ids[start:stop]
        if start >= p:
            return self.output_ids[start - p : stop - p]
        return self.prompt_ids[start:] + self.output_ids[: stop - p]


class BlockManager:
    """A pool of `num_blocks` blocks of `block_size` slots; block tables per sequence; a LIFO free list.

    LIFO: the blocks freed last are handed out first, so a server under a steady load keeps touching the
    same memory (its resident size stays flat) instead of wandering over the whole pool.
    block_size=None: fixed-size state, one block a sequence whatever its length.
    """

    def __init__(self, num_blocks: int, block_size: int | None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: at least one block is needed")
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self.tables: dict[int, list[int]] = {}
        self._refs: dict[int, int] = {}  # block -> how many tables hold it (shared prompt blocks: more than 1)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        if num_tokens <= 0:
            return 0
        if self.block_size is None:
            return 1
        return -(-num_tokens // self.block_size)

    @property
    def capacity_tokens(self) -> int | None:
        """The most tokens one sequence can ever hold (None: unbounded, a state-space model)."""
        return None if self.block_size is None else self.num_blocks * self.block_size

    def extra_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Blocks `seq_id` still needs to hold `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self.tables.get(seq_id, ())))

    def can_hold(self, seq_id: int, num_tokens: int, reserve: int = 0) -> bool:
        return self.extra_blocks(seq_id, num_tokens) + reserve <= len(self._free)

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        need = self.extra_blocks(seq_id, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"sequence {seq_id} needs {need} blocks; {len(self._free)} free")
        table = self.tables.setdefault(seq_id, [])
        for _ in range(need):
            b = self._free.pop()
            self._refs[b] = 1
            table.append(b)

    def share(self, seq_id: int, blocks: list[int]) -> None:
        """Give a sequence with no blocks yet these (full, never again written) blocks of another one."""
        if self.tables.get(seq_id):
            raise RuntimeError(f"sequence {seq_id} already holds blocks")
        self.tables[seq_id] = list(blocks)
        for b in blocks:
            self._refs[b] += 1

    def free(self, seq_id: int) -> None:
        for b in reversed(self.tables.pop(seq_id, [])):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                del self._refs[b]
                self._free.append(b)

    def fits_tokens(self, seq_id: int, reserve: int = 0) -> int:
        """How many token slots `seq_id` can reach with its blocks plus the free ones (minus `reserve`)."""
        blocks = len(self.tables.get(seq_id, ())) + max(0, len(self._free) - reserve)
        if self.block_size is None:
            return 1 << 62 if blocks else 0
        return blocks * self.block_size


@dataclass
class SchedulerOutput:
    """One step's work: (sequence, number of its tokens to compute from seq.num_computed) pairs, in the
    order decode rows first, then prefill chunks; plus the sequences preempted in this step."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    """Waiting and running queues, a per-step token budget, chunked prefill, preemption by recompute.

    max_batch_size: most sequences running at once. max_batch_tokens: most tokens computed in one step
    (must be >= max_batch_size, so that every running sequence can decode in every step).
    watermark_blocks: free blocks kept back when admitting a new sequence, so that the running ones can grow a
    while before anyone is preempted.
    """

    def __init__(self, blocks: BlockManager, max_batch_size: int = 32, max_batch_tokens: int = 512,
                 watermark_blocks: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        if max_batch_tokens < max_batch_size:
            raise ValueError(f"max_batch_tokens={max_batch_tokens} must be >= max_batch_size={max_batch_size}, "
                             "or running sequences could not all decode in a step")
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        if watermark_blocks is None:
            watermark_blocks = blocks.num_blocks // 100 if blocks.block_size is not None else 0
        self.watermark_blocks = watermark_blocks
        self.waiting: list[Sequence] = []  # sorted by arrival (preempted sequences keep theirs: they go first)
        self.running: list[Sequence] = []  # sorted by arrival
        self.seqs: dict[int, Sequence] = {}
        self._arrivals = itertools.count()
        self.num_preemptions = 0

    # ---- queue management -----------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self.seqs:
            raise ValueError(f"sequence id {seq.seq_id} is already scheduled")
        if not seq.prompt_ids:
            raise ValueError(f"sequence {seq.seq_id} has an empty prompt")
        seq.arrival = next(self._arrivals)
        seq.status = SeqStatus.WAITING
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)  # the newest arrival sorts last

    def finish(self, seq_id: int) -> Sequence | None:
        """Remove a sequence (finished, stopped or cancelled) and free its blocks at once."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return None
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)
        self.blocks.free(seq_id)
        seq.status = SeqStatus.FINISHED
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- one step ---------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_batch_tokens
        scheduled: set[int] = set()

        # 1. decoding sequences, oldest first.
        for seq in [s for s in self.running if s.uncomputed == 1]:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            if not self._make_room(seq, seq.num_tokens, scheduled, out):
                continue  # seq itself was preempted
            self._schedule(seq, 1, scheduled, out)
            budget -= 1

        # 2. running sequences in the middle of a (chunked) prefill or a recompute, oldest first.
        for seq in [s for s in self.running if s.uncomputed > 1]:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue
            n = self._fit(seq, min(seq.uncomputed, budget), reserve=0)
            if n == 0:
                # Out of memory: newer sequences that are not in this step give way; else wait a step.
                self._preempt_newer_than(seq, scheduled, out)
                n = self._fit(seq, min(seq.uncomputed, budget), reserve=0)
                if n == 0:
                    continue
            self._schedule(seq, n, scheduled, out)
            budget -= n

        # 3. new (or preempted) sequences in arrival order, never in a step that had to preempt.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if not self._borrow_prompt(seq):
                break  # its prompt's source is still prefilling: it will lend its blocks in a step or two
            n = self._fit(seq, min(seq.uncomputed, budget), reserve=self.watermark_blocks)
            if n == 0:
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.pop(0)
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            self._schedule(seq, n, scheduled, out)
            budget -= n

        # Decode rows first, then prefill chunks (the engine runs them as two forward passes).
        out.scheduled.sort(key=lambda item: (item[1] != 1, item[0].arrival))
        return out

    def commit(self, out: SchedulerOutput) -> list[Sequence]:
        """Advance every scheduled sequence by its tokens; return those that must now sample a token."""
        ready = []
        for seq, n in out.scheduled:
            if seq.status is SeqStatus.FINISHED:
                continue
            seq.num_computed += n
            if seq.num_computed == seq.num_tokens:
                ready.append(seq)
        return ready

    def append_token(self, seq_id: int, token_id: int) -> None:
        self.seqs[seq_id].output_ids.append(token_id)

    # ---- helpers ---------------------------------------------------------------------------------------------

    def _schedule(self, seq: Sequence, n: int, scheduled: set[int], out: SchedulerOutput) -> None:
        self.blocks.allocate(seq.seq_id, seq.num_computed + n)
        scheduled.add(seq.seq_id)
        out.scheduled.append((seq, n))

    def _borrow_prompt(self, seq: Sequence) -> bool:
        """Share the full prompt blocks of seq.prompt_source (its own last prompt token is always computed again,
        for its own logits). False: wait, the source has not computed them yet."""
        src = seq.prompt_source
        if src is None or seq.num_computed or self.blocks.block_size is None:
            return True
        full = (len(seq.prompt_ids) - 1) // self.blocks.block_size  # blocks wholly before the last prompt token
        if src.status is SeqStatus.FINISHED or full == 0:
            seq.prompt_source = None
            return True
        if src.status is not SeqStatus.RUNNING or src.num_computed < full * self.blocks.block_size:
            return False
        self.blocks.share(seq.seq_id, self.blocks.tables[src.seq_id][:full])
        seq.num_computed = full * self.blocks.block_size
        return True

    def _fit(self, seq: Sequence, n: int, reserve: int) -> int:
        """The largest chunk <= n of seq's uncomputed tokens that fits in its blocks plus the free ones."""
        reach = self.blocks.fits_tokens(seq.seq_id, reserve=reserve)
        return max(0, min(n, reach - seq.num_computed))

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: set[int], out: SchedulerOutput) -> bool:
        """Free blocks until seq can hold num_tokens, preempting the newest unscheduled running sequences;
        the newest may be seq itself (then False)."""
        while not self.blocks.can_hold(seq.seq_id, num_tokens):
            victims = [s for s in self.running if s.seq_id not in scheduled]
            victim = victims[-1]  # seq itself is unscheduled, so there is always one
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt_newer_than(self, seq: Sequence, scheduled: set[int], out: SchedulerOutput) -> None:
        for victim in reversed([s for s in self.running if s.seq_id not in scheduled and s.arrival > seq.arrival]):
            if self._fit(seq, 1, reserve=0):
                return
            self._preempt(victim, out)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute later: drop the cache, keep the tokens; back to the waiting queue in arrival order."""
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)
        out.preempted.append(seq)


def total_blocks_for(lengths: Iterable[int], block_size: int | None) -> int:
    """Blocks needed to hold sequences of these lengths at once (sizing a pool that never preempts)."""
    if block_size is None:
        return sum(1 for _ in lengths)
    return sum(-(-n // block_size) for n in lengths)
