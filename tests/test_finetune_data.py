"""Fine-tuning data: every format parses, bad files fail clearly, labels sit on assistant tokens only, packing
keeps documents apart, the held-out split and the batch stream are deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gyrfalcon.finetune.data import (
    IGNORE,
    DataFormatError,
    Example,
    PackedBatches,
    Record,
    detect_format,
    eval_batches,
    load_records,
    pack_examples,
    parse_guanaco,
    split_records,
    tokenize_conversation,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "finetune"
CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Farewell"}]


@pytest.fixture(scope="module")
def tokenizer():
    from gyrfalcon.api import DEFAULT_MODEL
    from gyrfalcon.tokenizer import Tokenizer

    return Tokenizer.from_dir(DEFAULT_MODEL)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ---------------------------------------------------------------------------------------------------------------
# formats


def test_guanaco_text_and_jsonl(tmp_path):
    text = "### Human: What is 2+2?### Assistant: 4.### Human: And 3+3? ### Assistant: 6.\n" \
           "### Human: Name a colour. ### Assistant: Red.\n"
    p = _write(tmp_path, "g.txt", text)
    assert detect_format(p) == "guanaco"
    recs = load_records(p)
    assert [r.messages for r in recs] == [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
         {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]]
    j = _write(tmp_path, "g.jsonl", "\n".join(json.dumps({"text": line}) for line in text.splitlines()))
    assert detect_format(j) == "guanaco"
    assert [r.messages for r in load_records(j)] == [r.messages for r in recs]
    # multi-line turns, conversations separated by blank lines
    block = "### Human: Write two lines.\n### Assistant: One\nTwo\n\n### Human: Hi\n### Assistant: Hello"
    recs = load_records(_write(tmp_path, "b.txt", block))
    assert recs[0].messages[1]["content"] == "One\nTwo" and recs[1].messages[1]["content"] == "Hello"


def test_alpaca(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    p = _write(tmp_path, "a.json", json.dumps(rows, indent=2))
    assert detect_format(p) == "alpaca"
    recs = load_records(p)
    assert recs[0].messages == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                {"role": "assistant", "content": "5"}]
    assert recs[1].messages[0]["content"] == "Say hi."


def test_messages_jsonl(tmp_path):
    p = _write(tmp_path, "m.jsonl", json.dumps({"messages": CONV}) + "\n" + json.dumps(CONV[:2]) + "\n")
    assert detect_format(p) == "messages"
    recs = load_records(p)
    assert recs[0].messages == CONV and recs[1].messages == CONV[:2]


def _tree():
    def msg(mid, role, text, rank=None, replies=(), deleted=False):
        return {"message_id": mid, "role": role, "text": text, "rank": rank, "deleted": deleted,
                "review_result": True, "replies": list(replies)}

    return {"message_tree_id": "t1", "prompt": msg("p", "prompter", "Q?", replies=[
        msg("a2", "assistant", "second best", rank=1),
        msg("a1", "assistant", "best", rank=0, replies=[
            msg("f", "prompter", "follow up", replies=[msg("g", "assistant", "answer")])]),
        msg("a3", "assistant", "removed", rank=2, deleted=True)])}


def test_oasst_tree_paths(tmp_path):
    p = _write(tmp_path, "t.jsonl", json.dumps(_tree()) + "\n")
    assert detect_format(p) == "oasst"
    best = load_records(p)
    assert [[m["content"] for m in r.messages] for r in best] == [["Q?", "best", "follow up", "answer"]]
    every = load_records(p, oasst_paths="all")
    assert sorted(tuple(m["content"] for m in r.messages) for r in every) == [
        ("Q?", "best", "follow up", "answer"), ("Q?", "second best")]
    assert {r.group for r in every} == {"t1"}


def test_oasst_flat_messages(tmp_path):
    def flat(node, parent=None):
        yield {k: v for k, v in node.items() if k != "replies"} | {"parent_id": parent}
        for r in node["replies"]:
            yield from flat(r, node["message_id"])

    p = _write(tmp_path, "m.jsonl", "\n".join(json.dumps(m) for m in flat(_tree()["prompt"])))
    assert detect_format(p) == "oasst"
    assert [[m["content"] for m in r.messages] for r in load_records(p)] == [["Q?", "best", "follow up", "answer"]]


@pytest.mark.skipif(not (SHARED / "oasst_en_100_trees").is_dir(), reason="../shared/data/finetune not present")
def test_shared_files_parse():
    trees = load_records(SHARED / "oasst_en_100_trees" / "en_100_tree.jsonl")
    assert len(trees) == 100 and all(r.messages[-1]["role"] == "assistant" for r in trees)
    assert all(m["role"] in ("user", "assistant") for r in trees for m in r.messages)
    flat = load_records(SHARED / "oasst_en_100_trees" / "en_100_message.jsonl")
    assert sorted(r.group for r in flat) == sorted(r.group for r in trees)
    alpaca = load_records(SHARED / "alpaca_subset_2k" / "alpaca_small.json")
    assert len(alpaca) == 2000


@pytest.mark.parametrize("name,text,match", [
    ("empty.jsonl", "", "empty"),
    ("plain.txt", "just some prose\nwith lines\n", "not a chat or instruction file"),
    ("keys.jsonl", '{"question": "q", "answer": "a"}\n', "not a known chat format"),
    ("broken.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n{oops\n', ":2: not a JSON line"),
    ("norole.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', "messages\\[0\\]"),
    ("noreply.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', "no assistant message"),
    ("noanswer.txt", "### Human: hello there\n", "no '### Assistant:' turn"),
    ("alpaca.json", '[{"instruction": "x", "output": 3}]', "must be strings"),
])
def test_bad_data_errors(tmp_path, name, text, match):
    p = _write(tmp_path, name, text)
    with pytest.raises(DataFormatError, match=match):
        load_records(p)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataFormatError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")
    p = _write(tmp_path, "m.jsonl", json.dumps({"messages": CONV}))
    with pytest.raises(DataFormatError, match="not one of"):
        load_records(p, fmt="sharegpt")
    with pytest.raises(DataFormatError, match="before the first"):
        parse_guanaco("preamble ### Human: a ### Assistant: b")


# ---------------------------------------------------------------------------------------------------------------
# labels


def test_assistant_only_labels(tokenizer):
    ex = tokenize_conversation(tokenizer, CONV)
    assert len(ex.targets) == len(ex.input_ids)
    assert tokenizer.decode(ex.input_ids) == "User: Hi\nAssistant: Hello there\nUser: Bye\nAssistant: Farewell\n" \
        + tokenizer.eos_token
    labeled = [ex.input_ids[t + 1] for t in range(len(ex) - 1) if ex.targets[t] != IGNORE]
    # targets[t] is token t+1 exactly where that token is the assistant's
    assert all(ex.targets[t] in (IGNORE, ex.input_ids[t + 1]) for t in range(len(ex) - 1))
    assert ex.targets[-1] == IGNORE
    assert tokenizer.decode(labeled) == " Hello there\n Farewell\n" + tokenizer.eos_token
    # the prompt side: every token of "User: Hi\nAssistant:" and of "User: Bye\nAssistant:" is unlabeled
    unlabeled = ex.input_ids[:1] + [ex.input_ids[t] for t in range(1, len(ex)) if ex.targets[t - 1] == IGNORE]
    assert tokenizer.decode(unlabeled) == "User: Hi\nAssistant:User: Bye\nAssistant:"


def test_truncation_keeps_targets_inside(tokenizer):
    full = tokenize_conversation(tokenizer, CONV)
    cut = tokenize_conversation(tokenizer, CONV, max_len=12)
    assert cut.input_ids == full.input_ids[:12]
    assert cut.targets[:-1] == full.targets[:11] and cut.targets[-1] == IGNORE


# ---------------------------------------------------------------------------------------------------------------
# packing, split, batches


def _ex(n: int, start: int) -> Example:
    ids = list(range(start, start + n))
    return Example(ids, ids[1:] + [IGNORE])


def test_packing_layout():
    rows = pack_examples([_ex(5, 10), _ex(4, 20), _ex(6, 30), _ex(3, 40)], seq_len=10, pad_id=0)
    assert rows.input_ids.tolist() == [[10, 11, 12, 13, 14, 20, 21, 22, 23, 0], [30, 31, 32, 33, 34, 35, 40, 41, 42, 0]]
    assert rows.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2, 0]]
    assert rows.segments.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1, 2]]
    # no target crosses a document boundary: the last token of each document and the padding predict nothing
    t = rows.targets.tolist()
    assert t[0] == [11, 12, 13, 14, IGNORE, 21, 22, 23, IGNORE, IGNORE]
    unpacked = pack_examples([_ex(5, 10), _ex(4, 20)], seq_len=10, pad_id=0, pack=False)
    assert len(unpacked) == 2 and unpacked.input_ids[1].tolist()[:4] == [20, 21, 22, 23]
    long = pack_examples([_ex(15, 1)], seq_len=10, pad_id=0)
    assert long.input_ids.tolist() == [list(range(1, 11))] and long.targets[0, -1] == IGNORE


def test_split_is_seeded_and_by_group():
    recs = [Record(CONV, f"g{i // 2}") for i in range(40)]
    a_train, a_val = split_records(recs, 0.25, seed=3)
    b_train, b_val = split_records(recs, 0.25, seed=3)
    assert [r.group for r in a_val] == [r.group for r in b_val] and len(a_val) == 10
    assert not {r.group for r in a_train} & {r.group for r in a_val}
    _, c_val = split_records(recs, 0.25, seed=4)
    assert {r.group for r in c_val} != {r.group for r in a_val}
    assert split_records(recs[:2], 0.1, 0)[1] == []  # one group: nothing to hold out


def test_batch_stream_resumes_and_shards():
    exs = [_ex(3 + i % 5, 100 * i) for i in range(30)]
    stream = PackedBatches(exs, seq_len=16, batch_size=2, pad_id=0, seed=7)
    first = [next(stream) for _ in range(25)]  # runs past the first epoch
    again = PackedBatches(exs, seq_len=16, batch_size=2, pad_id=0, seed=7)
    for _ in range(10):
        next(again)
    state = again.state_dict()
    resumed = PackedBatches(exs, seq_len=16, batch_size=2, pad_id=0, seed=7)
    resumed.load_state_dict(state)
    for want in first[10:]:
        assert torch.equal(next(resumed)["input_ids"], want["input_ids"])
    # two ranks together see exactly the single stream, interleaved
    r0 = PackedBatches(exs, seq_len=16, batch_size=2, pad_id=0, seed=7, rank=0, world=2)
    r1 = PackedBatches(exs, seq_len=16, batch_size=2, pad_id=0, seed=7, rank=1, world=2)
    for k in range(0, 20, 2):
        assert torch.equal(next(r0)["input_ids"], first[k]["input_ids"])
        assert torch.equal(next(r1)["input_ids"], first[k + 1]["input_ids"])
    with pytest.raises(ValueError, match="seeded"):
        PackedBatches(exs, 16, 2, 0, seed=8).load_state_dict(state)
    with pytest.raises(DataFormatError, match="fewer than one batch"):
        PackedBatches(exs[:2], 16, 4, 0, seed=0)
    held = eval_batches(exs[:5], 16, 2, 0)
    assert sum(b["input_ids"].shape[0] for b in held) == len(pack_examples(exs[:5], 16, 0))
