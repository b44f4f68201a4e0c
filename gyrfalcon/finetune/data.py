"""Chat and instruction data for supervised fine-tuning: local files -> conversations -> token rows -> batches.

Formats (detected from the file, or named with `fmt=`):

* ``oasst``    OpenAssistant message trees, one tree per JSON line (``{"message_tree_id", "prompt": {...,
               "replies": [...]}}``), or the flat export with one message per line (``message_id``/``parent_id``).
               Each tree becomes conversation paths from the root prompt: the best-ranked reply at every turn (the
               Guanaco recipe, `oasst_paths="best"`) or every root-to-leaf path (`"all"`). Deleted messages and
               those that failed review are dropped.
* ``guanaco``  text with ``### Human: ... ### Assistant: ...`` turns: a plain text file (one conversation per
               line or per blank-line-separated block) or JSON lines ``{"text": ...}``.
* ``alpaca``   a JSON list (or JSON lines) of ``{"instruction", "input", "output"}``: the user turn is the
               instruction, followed by the input after a blank line when there is one.
* ``messages`` JSON lines of ``{"messages": [{"role", "content"}, ...]}`` (or a bare list of such dicts).

A conversation is rendered with the tokenizer's chat template (`Tokenizer.apply_chat_template`: the
Falcon-instruct form ``User: ...\\nAssistant: ...\\n`` unless the model ships a Jinja template), followed by EOS.
Only the characters the assistant produces (each reply, its closing newline and the final EOS) carry labels; every
other token is -100 and adds nothing to the loss. Which characters those are is found by rendering the prefixes of
the conversation, so it holds for any template whose renderings of prefixes are prefixes of the whole.

Packing: examples (each already shifted into next-token targets, so no target crosses from one document into the
next) are laid end to end into rows of exactly `seq_len` tokens. Every token carries its document's id (`segments`)
and its position inside the document (`positions`, restarting at 0), from which `PackedCausalLM` builds a
block-diagonal causal mask: a token attends only to earlier tokens of its own document, and rotary positions
restart per document, so a packed document's logits equal those of the document alone.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE = -100
FORMATS = ("oasst", "guanaco", "alpaca", "messages")
Conversation = list[dict[str, str]]


class DataFormatError(ValueError):
    """The data file is not in a format we read, or a record in it is malformed (the message says where)."""


# ---------------------------------------------------------------------------------------------------------------
# reading files into conversations


@dataclass
class Record:
    """One conversation and the group it belongs to (paths of one OASST tree share a group, so the held-out split
    never puts one path of a tree in training and another in evaluation)."""

    messages: Conversation
    group: str


def _read_json_records(path: Path) -> list[Any]:
    """A JSON document (list or single object) or JSON lines; DataFormatError naming the line otherwise."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise DataFormatError(f"{path}: the file is empty")
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: not valid JSON ({e})") from None
        return list(data)
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == 1 and stripped[0] == "{":
                try:  # one pretty-printed object
                    return [json.loads(text)]
                except json.JSONDecodeError:
                    pass
            raise DataFormatError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
    return records


_GUANACO_MARK = re.compile(r"###\s*(Human|Assistant)\s*:")


def detect_format(path: str | Path) -> str:
    """The format of a data file (one of FORMATS); DataFormatError saying what was seen otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    with path.open("r", encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise DataFormatError(f"{path}: the file is empty")
    first = head.lstrip()[:1]
    if first in "[{":
        records = None
        if first == "{":  # JSON lines: the first record decides (a bad later line is reported by the reader)
            try:
                records = [json.loads(head.lstrip().splitlines()[0])]
            except json.JSONDecodeError:
                records = None
        if records is None:
            records = _read_json_records(path)  # a JSON document: its parse error is the message
        if records:
            rec = records[0]
            if isinstance(rec, dict):
                if "message_tree_id" in rec and isinstance(rec.get("prompt"), dict):
                    return "oasst"
                if "message_id" in rec and "parent_id" in rec and "role" in rec:
                    return "oasst"
                if "instruction" in rec and "output" in rec:
                    return "alpaca"
                if "messages" in rec:
                    return "messages"
                if isinstance(rec.get("text"), str) and _GUANACO_MARK.search(rec["text"]):
                    return "guanaco"
            if isinstance(rec, list) and rec and isinstance(rec[0], dict) and "role" in rec[0]:
                return "messages"
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise DataFormatError(
                f"{path}: JSON records with {keys} are not a known chat format; expected OASST trees "
                "(message_tree_id/prompt), Alpaca (instruction/input/output), messages ({\"messages\": [...]}) or "
                "Guanaco ({\"text\": \"### Human: ... ### Assistant: ...\"})")
    if _GUANACO_MARK.search(head):
        return "guanaco"
    raise DataFormatError(
        f"{path}: not a chat or instruction file (no '### Human:' turns, not JSON); formats read: "
        f"{', '.join(FORMATS)}. For continued pretraining on plain text use --full")


def _oasst_ok(msg: dict[str, Any]) -> bool:
    return not msg.get("deleted", False) and msg.get("review_result", True) is not False and bool(msg.get("text"))


def _oasst_role(msg: dict[str, Any], where: str) -> str:
    role = msg.get("role")
    if role == "prompter":
        return "user"
    if role == "assistant":
        return "assistant"
    raise DataFormatError(f"{where}: message role {role!r} is neither 'prompter' nor 'assistant'")


def _rank_key(msg: dict[str, Any]) -> tuple[int, float]:
    rank = msg.get("rank")
    return (0, float(rank)) if isinstance(rank, (int, float)) else (1, 0.0)


def _oasst_paths(root: dict[str, Any], mode: str, where: str) -> list[Conversation]:
    paths: list[Conversation] = []

    def walk(msg: dict[str, Any], prefix: Conversation) -> None:
        path = prefix + [{"role": _oasst_role(msg, where), "content": msg["text"]}]
        replies = [r for r in msg.get("replies") or [] if _oasst_ok(r)]
        if mode == "best" and replies:
            replies = [min(replies, key=_rank_key)]
        if not replies:
            # A conversation ends on an assistant reply; a trailing prompt has nothing to learn from.
            while path and path[-1]["role"] != "assistant":
                path = path[:-1]
            if path:
                paths.append(path)
            return
        for r in replies:
            walk(r, path)

    if _oasst_ok(root):
        walk(root, [])
    return paths


def _oasst_trees_from_messages(records: list[dict[str, Any]], path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Rebuild trees from the message export: one message per line, linked by parent_id (a line may also carry
    its replies nested, as the OA sample's root lines do; those are kept)."""
    nodes: dict[str, dict[str, Any]] = {}
    for i, rec in enumerate(records, 1):
        if not isinstance(rec, dict) or "message_id" not in rec:
            raise DataFormatError(f"{path}:{i}: not an OASST message (no message_id)")
        nodes[rec["message_id"]] = {**rec, "replies": list(rec.get("replies") or [])}
    roots = []
    for node in nodes.values():
        parent = node.get("parent_id")
        if parent is None:
            roots.append((node["message_id"], node))
        elif parent in nodes:
            siblings = nodes[parent]["replies"]
            if not any(r.get("message_id") == node["message_id"] for r in siblings):
                siblings.append(node)
    return roots


def read_oasst(path: Path, paths: str = "best") -> list[Record]:
    if paths not in ("best", "all"):
        raise ValueError(f"oasst_paths={paths!r} must be 'best' or 'all'")
    records = _read_json_records(path)
    if records and isinstance(records[0], dict) and "message_tree_id" in records[0]:
        trees = []
        for i, rec in enumerate(records, 1):
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), dict):
                raise DataFormatError(f"{path}:{i}: an OASST tree needs a 'prompt' object")
            trees.append((str(rec["message_tree_id"]), rec["prompt"]))
    else:
        trees = _oasst_trees_from_messages(records, path)
    out = []
    for tree_id, root in trees:
        for conv in _oasst_paths(root, paths, f"{path} tree {tree_id}"):
            out.append(Record(conv, tree_id))
    return out


def parse_guanaco(text: str, where: str = "text") -> Conversation:
    """``### Human: a ### Assistant: b ...`` -> messages; DataFormatError when there is no turn or no reply."""
    parts = _GUANACO_MARK.split(text)
    if len(parts) < 3:
        raise DataFormatError(f"{where}: no '### Human:' / '### Assistant:' turns")
    if parts[0].strip():
        raise DataFormatError(f"{where}: text before the first '### Human:' turn: {parts[0].strip()[:40]!r}")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{where}: no '### Assistant:' turn")
    return messages


def read_guanaco(path: Path) -> list[Record]:
    if path.read_text(encoding="utf-8").lstrip()[:1] == "{":
        out = []
        for i, rec in enumerate(_read_json_records(path), 1):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataFormatError(f"{path}:{i}: expected {{\"text\": \"### Human: ...\"}}")
            out.append(Record(parse_guanaco(rec["text"], f"{path}:{i}"), str(i)))
        return out
    text = path.read_text(encoding="utf-8")
    # One conversation per line when every non-empty line starts a conversation, else blank-line-separated blocks.
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if all(ln.lstrip().startswith("### Human") for ln in lines):
        blocks = lines
    else:
        blocks = [b for b in re.split(r"\n\s*\n(?=\s*###\s*Human)", text) if b.strip()]
    return [Record(parse_guanaco(b, f"{path} conversation {i}"), str(i)) for i, b in enumerate(blocks, 1)]


def read_alpaca(path: Path) -> list[Record]:
    out = []
    for i, rec in enumerate(_read_json_records(path), 1):
        if not isinstance(rec, dict):
            raise DataFormatError(f"{path} record {i}: expected an object with instruction/input/output")
        instruction, inp, output = rec.get("instruction"), rec.get("input", ""), rec.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(inp, (str, type(None))):
            raise DataFormatError(f"{path} record {i}: 'instruction' and 'output' must be strings")
        user = instruction.strip() + (f"\n\n{inp.strip()}" if inp and inp.strip() else "")
        out.append(Record([{"role": "user", "content": user}, {"role": "assistant", "content": output.strip()}],
                          str(i)))
    return out


def read_messages(path: Path) -> list[Record]:
    out = []
    for i, rec in enumerate(_read_json_records(path), 1):
        msgs = rec.get("messages") if isinstance(rec, dict) else rec
        where = f"{path} record {i}"
        if not isinstance(msgs, list) or not msgs:
            raise DataFormatError(f"{where}: expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise DataFormatError(f"{where}: messages[{j}] must be {{\"role\": system|user|assistant, "
                                      f"\"content\": str}}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataFormatError(f"{where}: no assistant message to learn from")
        out.append(Record([{"role": m["role"], "content": m["content"]} for m in msgs], str(i)))
    return out


def load_records(path: str | Path, fmt: str | None = None, oasst_paths: str = "best") -> list[Record]:
    """Every conversation in a data file (format detected unless `fmt` names one of FORMATS)."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    readers = {"oasst": lambda: read_oasst(path, oasst_paths), "guanaco": lambda: read_guanaco(path),
               "alpaca": lambda: read_alpaca(path), "messages": lambda: read_messages(path)}
    if fmt not in readers:
        raise DataFormatError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    records = readers[fmt]()
    if not records:
        raise DataFormatError(f"{path}: no conversations with an assistant reply ({fmt} format)")
    return records


# ---------------------------------------------------------------------------------------------------------------
# conversations -> tokens with assistant-only labels


@dataclass
class Example:
    """One tokenized conversation: `input_ids` and the next-token `targets` (targets[t] is the label of token
    t + 1, or -100: not an assistant token, or the end of the document)."""

    input_ids: list[int]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE for t in self.targets)


def assistant_spans(tokenizer, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the assistant writes (reply plus the template's text
    closing the turn)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)) if i else 0
        end_text = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(end_text) or start > len(end_text):
            raise DataFormatError("the chat template does not render a conversation's prefixes as prefixes of it; "
                                  "assistant-only labels cannot be located")
        spans.append((start, len(end_text)))
    return text, spans


def tokenize_conversation(tokenizer, messages: Conversation, max_len: int | None = None,
                          add_eos: bool = True) -> Example:
    """Token ids of the rendered conversation (+ EOS) with targets on assistant tokens only."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    labeled = []
    span_i = 0
    for start, _end in enc.offsets:
        while span_i < len(spans) and start >= spans[span_i][1]:
            span_i += 1
        labeled.append(span_i < len(spans) and spans[span_i][0] <= start < spans[span_i][1])
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None:
        ids.append(eos)
        labeled.append(messages[-1]["role"] == "assistant")
    if max_len is not None:
        ids, labeled = ids[:max_len], labeled[:max_len]
    targets = [ids[t + 1] if labeled[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(ids, targets)


def tokenize_text_document(ids: Sequence[int]) -> Example:
    """A plain-text document: every next token is a target (continued pretraining)."""
    ids = list(ids)
    return Example(ids, ids[1:] + [IGNORE])


# ---------------------------------------------------------------------------------------------------------------
# split, packing, batches


def split_records(records: Sequence[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, held-out) by group (an OASST tree, a file record), drawn with a fixed seed.

    At least one group is held out when `val_fraction` > 0 and there are two groups or more.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    groups = sorted({r.group for r in records})
    random.Random(seed).shuffle(groups)
    n_val = round(len(groups) * val_fraction)
    if val_fraction > 0 and len(groups) > 1:
        n_val = min(max(n_val, 1), len(groups) - 1)
    held = set(groups[:n_val])
    return [r for r in records if r.group not in held], [r for r in records if r.group in held]


@dataclass
class PackedRows:
    """Rows of exactly seq_len tokens: [N, T] input_ids, targets, positions (restart at 0 per document) and
    segments (document number within the row; padding is its own segment, with no targets)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "targets": self.targets[index],
                "positions": self.positions[index], "segments": self.segments[index]}

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int, pack: bool = True) -> PackedRows:
    """Lay `examples` (in the given order) end to end into rows of `seq_len` tokens; a document that does not fit
    in what is left of a row starts the next row (documents longer than seq_len are cut to it). With
    `pack=False` every example gets its own row (right padding): for models whose state cannot be reset
    mid-row, such as Falcon-Mamba."""
    rows: list[tuple[list[int], list[int], list[int], list[int]]] = []
    cur: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])

    def flush() -> None:
        nonlocal cur
        if not cur[0]:
            return
        n = seq_len - len(cur[0])
        seg = (max(cur[3]) + 1) if cur[3] else 0
        cur[0].extend([pad_id] * n)
        cur[1].extend([IGNORE] * n)
        cur[2].extend(range(n))
        cur[3].extend([seg] * n)
        rows.append(cur)
        cur = ([], [], [], [])

    for ex in examples:
        if ex.n_targets == 0:
            continue
        ids, tg = ex.input_ids[:seq_len], ex.targets[:seq_len]
        if len(ids) < len(ex.input_ids):
            tg = tg[:-1] + [IGNORE]  # the cut document's last kept token has no next token in the row
        if not pack or len(cur[0]) + len(ids) > seq_len:
            flush()
        seg = (cur[3][-1] + 1) if cur[3] else 0
        cur[0].extend(ids)
        cur[1].extend(tg)
        cur[2].extend(range(len(ids)))
        cur[3].extend([seg] * len(ids))
    flush()
    if not rows:
        raise DataFormatError("no example has a target token (nothing for the assistant to learn)")
    t = [torch.tensor([r[k] for r in rows], dtype=torch.long) for k in range(4)]
    return PackedRows(*t)


def encode_records(tokenizer, records: Sequence[Record], seq_len: int) -> list[Example]:
    return [tokenize_conversation(tokenizer, r.messages, max_len=seq_len) for r in records]


class PackedBatches:
    """An endless, seeded stream of micro-batches over the examples: each epoch shuffles the examples with
    `seed + epoch`, packs them into rows and deals rows out `batch_size` at a time.

    Data parallel: micro-batches are numbered globally and rank r of `world` takes numbers r, r + world, ... So
    `world` processes each accumulating A micro-batches see exactly the micro-batches one process accumulating
    world x A sees, which is what makes their averaged gradient equal.

    Checkpointable: the state is the count of global micro-batches consumed (an epoch is rebuilt from its seed).
    """

    def __init__(self, examples: Sequence[Example], seq_len: int, batch_size: int, pad_id: int, seed: int,
                 pack: bool = True, rank: int = 0, world: int = 1):
        self.examples = list(examples)
        self.seq_len, self.batch_size, self.pad_id, self.seed, self.pack = seq_len, batch_size, pad_id, seed, pack
        self.rank, self.world = rank, world
        self.consumed = 0  # global micro-batch number of this rank's next batch, before adding the rank
        self._epoch: int | None = None
        self._rows: PackedRows | None = None
        self._epoch_sizes: dict[int, int] = {}
        rows0 = self._rows_of(0)
        if len(rows0) < batch_size:
            raise DataFormatError(f"the training data packs into {len(rows0)} rows of {seq_len} tokens, fewer than "
                                  f"one batch of {batch_size}; lower --batch-size or --seq-len, or add data")

    def _rows_of(self, epoch: int) -> PackedRows:
        if self._epoch != epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._rows = pack_examples([self.examples[i] for i in order], self.seq_len, self.pad_id, self.pack)
            self._epoch = epoch
            self._epoch_sizes[epoch] = len(self._rows) // self.batch_size
        return self._rows

    def _locate(self, number: int) -> tuple[int, int]:
        epoch = 0
        while True:
            if epoch not in self._epoch_sizes:
                self._rows_of(epoch)
            n = self._epoch_sizes[epoch]
            if number < n:
                return epoch, number
            number -= n
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        epoch, i = self._locate(self.consumed + self.rank)
        self.consumed += self.world
        rows = self._rows_of(epoch)
        return rows.batch(slice(i * self.batch_size, (i + 1) * self.batch_size))

    @property
    def epoch(self) -> int:
        return self._locate(self.consumed)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "consumed": self.consumed, "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data order was seeded with {state['seed']}, this run with {self.seed}")
        self.consumed = int(state["consumed"])


def eval_batches(examples: Sequence[Example], seq_len: int, batch_size: int, pad_id: int, pack: bool = True,
                 max_batches: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The held-out examples packed in file order into fixed batches (every eval scores the same tokens)."""
    if not examples:
        return []
    rows = pack_examples(examples, seq_len, pad_id, pack)
    out = [rows.batch(slice(i, i + batch_size)) for i in range(0, len(rows), batch_size)]
    return out[:max_batches] if max_batches else out
