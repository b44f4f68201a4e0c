"""The continuous-batching scheduler with a fake model runner: no torch, no model.

The fake runner "computes" whatever the scheduler hands it and, for a sequence that is due to sample, emits the
deterministic token `next_token(tokens so far)`. So a sequence's output is a pure function of its prompt, and any
token lost or duplicated by preemption/recompute shows up as a different output.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from gyrfalcon.runtime.scheduler import BlockManager, Scheduler, SeqStatus, Sequence


def next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 1000


def expected_output(prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    out = []
    for _ in range(n):
        t = next_token(toks)
        toks.append(t)
        out.append(t)
    return out


class FakeRunner:
    """Drives a Scheduler like the engine does, checking the cache bookkeeping as it goes."""

    def __init__(self, sched: Scheduler, max_new: dict[int, int]):
        self.sched = sched
        self.max_new = max_new
        self.steps: list[list[tuple[int, int]]] = []  # per step: (seq_id, n)
        self.computed: dict[int, list[int]] = {}  # tokens "in the cache" per sequence
        self.finished: dict[int, list[int]] = {}
        self.preemptions = 0

    def step(self) -> None:
        out = self.sched.schedule()
        assert out.num_tokens <= self.sched.max_batch_tokens
        assert len(self.sched.running) <= self.sched.max_batch_size
        for seq in out.preempted:
            self.computed.pop(seq.seq_id, None)
            self.preemptions += 1
        self.steps.append([(s.seq_id, n) for s, n in out.scheduled])
        for seq, n in out.scheduled:
            if seq.seq_id not in self.computed and seq.num_computed:  # it borrowed a prompt's blocks
                src = seq.prompt_source
                assert src is not None and src.prompt_ids[: seq.num_computed] == seq.prompt_ids[: seq.num_computed]
                assert seq.num_computed < len(seq.prompt_ids), "its own last prompt token is computed again"
                self.computed[seq.seq_id] = seq.token_slice(0, seq.num_computed)
            cached = self.computed.setdefault(seq.seq_id, [])
            assert len(cached) == seq.num_computed, "a chunk must start where the cache ends"
            cached.extend(seq.token_slice(seq.num_computed, seq.num_computed + n))
            bm = self.sched.blocks
            assert len(bm.tables[seq.seq_id]) >= bm.blocks_for(seq.num_computed + n), "blocks before compute"
        for seq in self.sched.commit(out):
            tok = next_token(seq.prompt_ids + seq.output_ids)
            self.sched.append_token(seq.seq_id, tok)
            if len(seq.output_ids) >= self.max_new[seq.seq_id]:
                self.finished[seq.seq_id] = list(seq.output_ids)
                self.sched.finish(seq.seq_id)
                self.computed.pop(seq.seq_id)
        used = {b for t in self.sched.blocks.tables.values() for b in t}
        assert len(used) == self.sched.blocks.num_used, "no block leaked"
        assert not used & set(self.sched.blocks._free), "no block both held and free"

    def run(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("the scheduler did not finish (deadlock or starvation)")


def make(num_blocks=64, block_size=4, batch=8, tokens=32, **kw) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_batch_size=batch, max_batch_tokens=tokens, **kw)


def add(sched: Scheduler, seq_id: int, prompt_len: int, runner_max: dict, max_new: int) -> Sequence:
    seq = Sequence(seq_id, [(seq_id * 7 + i) % 50 + 1 for i in range(prompt_len)])
    sched.add(seq)
    runner_max[seq_id] = max_new
    return seq


def test_scheduler_imports_no_torch():
    code = "import sys, gyrfalcon.runtime.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_outputs_are_exact_and_all_blocks_come_back():
    sched = make()
    max_new: dict[int, int] = {}
    for i, (p, n) in enumerate([(5, 7), (13, 3), (1, 9), (30, 4)]):
        add(sched, i, p, max_new, n)
    r = FakeRunner(sched, max_new)
    r.run()
    for i, seq_max in max_new.items():
        prompt = [(i * 7 + k) % 50 + 1 for k in range([5, 13, 1, 30][i])]
        assert r.finished[i] == expected_output(prompt, seq_max)
    assert sched.blocks.num_free == sched.blocks.num_blocks and not sched.blocks.tables


def test_token_budget_and_chunked_prefill():
    sched = make(tokens=16, batch=4)
    max_new: dict[int, int] = {}
    add(sched, 0, 3, max_new, 20)
    r = FakeRunner(sched, max_new)
    r.step()  # seq 0 prefilled in one go
    r.step()  # ... and decoding
    add(sched, 1, 40, max_new, 2)  # a long prompt: 40 tokens with a budget of 16
    r.step()
    assert r.steps[-1] == [(0, 1), (1, 15)], "the decode row goes first; the prompt gets the rest of the budget"
    r.step()
    r.step()
    assert r.steps[-2] == [(0, 1), (1, 15)] and r.steps[-1] == [(0, 1), (1, 10)]
    assert all(n <= 16 for step in r.steps for _, n in step)
    r.run()
    assert r.finished[1] == expected_output(sched_prompt(1, 40), 2)


def sched_prompt(seq_id: int, n: int) -> list[int]:
    return [(seq_id * 7 + i) % 50 + 1 for i in range(n)]


def test_every_running_sequence_decodes_every_step():
    sched = make(num_blocks=200, tokens=8, batch=8)
    max_new: dict[int, int] = {}
    for i in range(6):
        add(sched, i, 2, max_new, 10)
    r = FakeRunner(sched, max_new)
    r.step()  # four 2-token prompts fill the budget of 8
    r.step()  # four decode, the last two prompts come in
    add(sched, 99, 100, max_new, 1)  # a long prompt arrives: the six streams must not stall
    for _ in range(5):
        r.step()
        decoding = [sid for sid, n in r.steps[-1] if n == 1]
        assert sorted(decoding) == list(range(6))
        assert dict(r.steps[-1]).get(99, 0) == 2  # the prompt gets what the budget leaves
    r.run()


def test_batch_size_limit_and_fcfs_admission():
    sched = make(batch=2, tokens=64)
    max_new: dict[int, int] = {}
    for i in range(4):
        add(sched, i, 3, max_new, 3)
    r = FakeRunner(sched, max_new)
    r.step()
    assert [sid for sid, _ in r.steps[0]] == [0, 1]
    assert [s.seq_id for s in sched.waiting] == [2, 3]
    r.run()
    first_step = {sid: next(i for i, st in enumerate(r.steps) if any(s == sid for s, _ in st)) for sid in range(4)}
    assert first_step[0] <= first_step[1] < first_step[2] <= first_step[3]


def test_head_of_queue_is_not_overtaken():
    sched = make(num_blocks=10, block_size=4, tokens=64, batch=8, watermark_blocks=0)
    max_new: dict[int, int] = {}
    add(sched, 0, 30, max_new, 8)  # 8 blocks, soon 10
    r = FakeRunner(sched, max_new)
    r.step()
    add(sched, 1, 20, max_new, 1)  # only a first chunk fits in the 2 free blocks
    add(sched, 2, 1, max_new, 1)  # would fit whole, but must not overtake seq 1
    r.step()
    assert r.steps[-1] == [(0, 1), (1, 8)]
    r.run()
    start = {sid: next(i for i, st in enumerate(r.steps) if any(s == sid for s, _ in st)) for sid in (1, 2)}
    assert start[1] < start[2]
    assert r.finished[1] == expected_output(sched_prompt(1, 20), 1)


def test_preemption_by_recompute_loses_and_duplicates_nothing():
    # 12 blocks of 4 slots = 48 token slots for 4 sequences that will want 4 * 20 = 80: preemption is forced.
    sched = make(num_blocks=12, block_size=4, tokens=64, batch=4, watermark_blocks=0)
    max_new: dict[int, int] = {}
    for i in range(4):
        add(sched, i, 6, max_new, 14)
    r = FakeRunner(sched, max_new)
    r.run()
    assert r.preemptions > 0 and sched.num_preemptions == r.preemptions
    for i in range(4):
        assert r.finished[i] == expected_output(sched_prompt(i, 6), 14), i
    assert sched.blocks.num_free == 12


def test_preemption_takes_the_newest_and_it_comes_back_first():
    sched = make(num_blocks=6, block_size=4, tokens=64, batch=4, watermark_blocks=0)
    max_new: dict[int, int] = {}
    add(sched, 0, 4, max_new, 12)
    add(sched, 1, 4, max_new, 12)
    r = FakeRunner(sched, max_new)
    victims = []
    while sched.has_unfinished():
        out_before = sched.num_preemptions
        r.step()
        if sched.num_preemptions > out_before:
            victims.extend(s.seq_id for s in sched.waiting)
        if victims:
            break
    assert victims == [1], "the newest sequence gives way"
    add(sched, 2, 1, max_new, 1)  # arrived later: must queue behind the preempted sequence
    assert [s.seq_id for s in sched.waiting] == [1, 2]
    r.run()
    assert r.finished[1] == expected_output(sched_prompt(1, 4), 12)


def test_partial_prefills_cannot_deadlock():
    # Two long prompts that each fit alone, but not together: chunked prefill must not leave both stuck half-way.
    sched = make(num_blocks=10, block_size=4, tokens=8, batch=4, watermark_blocks=0)
    max_new: dict[int, int] = {}
    add(sched, 0, 30, max_new, 4)
    add(sched, 1, 30, max_new, 4)
    r = FakeRunner(sched, max_new)
    r.run(limit=500)
    assert r.finished[0] == expected_output(sched_prompt(0, 30), 4)
    assert r.finished[1] == expected_output(sched_prompt(1, 30), 4)


def test_finish_and_cancel_free_blocks_at_once():
    sched = make()
    max_new: dict[int, int] = {}
    add(sched, 0, 10, max_new, 100)
    add(sched, 1, 10, max_new, 100)
    r = FakeRunner(sched, max_new)
    r.step()
    used = sched.blocks.num_used
    assert used > 0
    sched.finish(0)  # e.g. the client went away
    assert sched.blocks.num_used < used and 0 not in sched.blocks.tables
    sched.finish(1)
    assert sched.blocks.num_used == 0 and not sched.has_unfinished()
    assert sched.finish(1) is None  # twice is harmless


def test_state_space_sequences_hold_one_slot():
    sched = Scheduler(BlockManager(2, None), max_batch_size=4, max_batch_tokens=16)
    max_new: dict[int, int] = {}
    for i in range(3):
        add(sched, i, 20, max_new, 5)
    r = FakeRunner(sched, max_new)
    r.step()  # 16 of seq 0's 20 prompt tokens
    r.step()  # its last 4, and 12 of seq 1's
    assert sched.num_running == 2 and sched.blocks.num_free == 0  # a third must wait for a free state slot
    assert all(len(t) == 1 for t in sched.blocks.tables.values())
    r.run()
    assert sorted(r.finished) == [0, 1, 2] and r.preemptions == 0
    assert r.finished[2] == expected_output(sched_prompt(2, 20), 5)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Scheduler(BlockManager(4, 4), max_batch_size=8, max_batch_tokens=4)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    sched = make()
    sched.add(Sequence(1, [1, 2]))
    with pytest.raises(ValueError, match="already"):
        sched.add(Sequence(1, [3]))
    with pytest.raises(ValueError, match="empty"):
        sched.add(Sequence(2, []))
    assert sched.seqs[1].status is SeqStatus.WAITING


def test_samples_of_one_prompt_borrow_its_cached_blocks():
    sched = make(num_blocks=64, block_size=4, tokens=64, batch=8)
    max_new: dict[int, int] = {}
    first = add(sched, 0, 18, max_new, 6)
    second = Sequence(1, list(first.prompt_ids), prompt_source=first)
    third = Sequence(2, list(first.prompt_ids), prompt_source=first)
    for s in (second, third):
        sched.add(s)
        max_new[s.seq_id] = 6
    r = FakeRunner(sched, max_new)
    r.step()
    # the source prefills all 18 tokens; the others wait a step for its blocks, then compute only the last 2
    assert r.steps[0] == [(0, 18)]
    r.step()
    assert dict(r.steps[1]) == {0: 1, 1: 2, 2: 2}
    tables = sched.blocks.tables
    assert tables[1][:4] == tables[2][:4] == tables[0][:4] and len(set(tables[1][4:]) & set(tables[0])) == 0
    assert sched.blocks.num_used == 5 + 1 + 1  # 4 shared prompt blocks + one own block each
    r.run()
    for i in range(3):
        assert r.finished[i] == expected_output(sched_prompt(0, 18), 6)
    assert sched.blocks.num_free == 64


def test_borrowed_blocks_survive_their_source():
    sched = make(num_blocks=64, block_size=4, tokens=64, batch=8)
    max_new = {0: 1}
    first = add(sched, 0, 9, max_new, 1)
    second = Sequence(1, list(first.prompt_ids), prompt_source=first)
    sched.add(second)
    max_new[1] = 12
    r = FakeRunner(sched, max_new)
    r.run()  # the source finishes at once; its shared blocks stay with the borrower until it is done
    assert r.finished[1] == expected_output(sched_prompt(0, 9), 12)
    assert sched.blocks.num_free == 64
