"""gyrfalcon.tokenizer: parity with transformers on the real Falcon tokenizer, streaming, chat, training."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from gyrfalcon.tokenizer import (
    ChatTemplateError,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    train_bpe_tokenizer,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FALCON_DIR = SHARED_DATA / "falcon_tokenizer"
SHAKESPEARE = SHARED_DATA / "corpus" / "tinyshakespeare" / "input.txt"

# Hand-picked strings that stress byte-level BPE: multi-byte characters split across tokens, ZWJ sequences,
# regional-indicator flags, combining marks, whitespace runs, and special tokens written inside text.
VARIED = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve café, Straße, Ångström, ÆØÅ æøå, ¿Qué pasó? ¡Olé!",
    "日本語のテキストと中文文本，还有한국어 문장。",
    "العربية: مرحبا بالعالم! والأرقام ١٢٣",
    "हिन्दी देवनागरी: नमस्ते दुनिया, क्षत्रिय",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵🇺🇸 🧑🏻‍💻 ❤️‍🔥 😀😃😄",
    "Math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∀x∈ℝ: x² ≥ 0 — e̊ a\u0301 (combining) ẞ Ǆ ﷽",
    "def f(x):\n\tif x:\n\t\treturn  [i ** 2 for i in range(10)]\n    else:\n        pass\n",
    "a   b\n\n\n\nc    \n  \t \r\nd\u00a0e\u200bf",
    "    leading spaces and trailing    ",
    "\n\n\n",
    "1234567890 3.14159 1,000,000 2024-05-31",
    ">>QUESTION<<What is 2+2?>>ANSWER<<4<|endoftext|>",
    "text<|endoftext|>more text <|endoftext|> >>TITLE<< x>>SUFFIX<<",
    "a literal replacement char \ufffd inside",
    "",
]


def _shakespeare_lines(n: int = 300) -> list[str]:
    if not SHAKESPEARE.is_file():
        return []
    return SHAKESPEARE.read_text(encoding="utf-8").splitlines()[:n]


def _corpus() -> list[str]:
    lines = _shakespeare_lines()
    # Single lines and one long multi-line block (newline handling, long sequences).
    return VARIED + lines + (["\n".join(lines)] if lines else [])


@pytest.fixture(scope="module")
def falcon() -> Tokenizer:
    if not (FALCON_DIR / "tokenizer.json").is_file():
        pytest.skip(f"Falcon tokenizer not found at {FALCON_DIR}")
    return Tokenizer.from_dir(FALCON_DIR)


@pytest.fixture(scope="module")
def hf_falcon():
    if not (FALCON_DIR / "tokenizer.json").is_file():
        pytest.skip(f"Falcon tokenizer not found at {FALCON_DIR}")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(FALCON_DIR))


# ------------------------------------------------------------------------------------------------------------------
# real Falcon tokenizer


def test_falcon_basics(falcon: Tokenizer) -> None:
    assert falcon.encode("Hello world") == [9856, 1079]
    assert falcon.decode([9856, 1079]) == "Hello world"
    assert falcon.encode(">>QUESTION<<What is 2+2?>>ANSWER<<") == [6, 1562, 304, 204, 29, 22, 29, 42, 5]
    assert falcon.vocab_size == len(falcon) == 65024
    assert falcon.eos_token == "<|endoftext|>"
    assert falcon.eos_token_id == 11
    assert falcon.pad_token_id == 11  # no pad token: falls back to eos
    assert falcon.bos_token_id is None  # the tokenizer files name no bos (config.json would)
    assert falcon.special_ids == set(range(12))
    assert falcon.token_to_id("<|endoftext|>") == 11
    assert falcon.id_to_token(9856) == "Hello"
    assert falcon.encode_batch(["Hello world", ""]) == [[9856, 1079], []]


def test_parity_with_transformers(falcon: Tokenizer, hf_falcon) -> None:
    corpus = _corpus()
    ours = falcon.encode_batch(corpus)
    for text, ids in zip(corpus, ours, strict=True):
        assert falcon.encode(text) == ids
        assert hf_falcon.encode(text) == ids, text
        for skip in (False, True):
            assert falcon.decode(ids, skip_special_tokens=skip) == hf_falcon.decode(ids, skip_special_tokens=skip)
    assert falcon.eos_token_id == hf_falcon.eos_token_id
    assert falcon.bos_token_id == hf_falcon.bos_token_id
    assert falcon.vocab_size == len(hf_falcon)
    assert falcon.special_ids == set(hf_falcon.all_special_ids)


def test_decode_round_trip(falcon: Tokenizer) -> None:
    for text in _corpus():
        assert falcon.decode(falcon.encode(text)) == text
    assert falcon.decode(falcon.encode("x<|endoftext|>y"), skip_special_tokens=True) == "xy"


def test_config_json_supplies_bos(tmp_path: Path, falcon: Tokenizer) -> None:
    shutil.copy(FALCON_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 11, "eos_token_id": [11, 0]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_token_id == 11 and tok.eos_token_id == 11 and tok.bos_token == "<|endoftext|>"


# ------------------------------------------------------------------------------------------------------------------
# streaming


def _stream(tok: Tokenizer, ids: list[int], **kw) -> list[str]:
    sd = StreamDecoder(tok, **kw)
    return [sd.push(i) for i in ids] + [sd.flush()]


@pytest.mark.parametrize("skip", [False, True])
def test_stream_matches_decode(falcon: Tokenizer, skip: bool) -> None:
    split_chars = 0
    for text in _corpus():
        ids = falcon.encode(text)
        pieces = _stream(falcon, ids, skip_special_tokens=skip)
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces), (text, pieces)
        assert "".join(pieces) == falcon.decode(ids, skip_special_tokens=skip)
        split_chars += sum("\ufffd" in falcon.decode([i]) for i in ids)
    assert split_chars > 10  # the corpus really does split characters across tokens


def test_stream_holds_incomplete_characters(falcon: Tokenizer) -> None:
    ids = falcon.encode(" 👨‍👩‍👧")
    assert any(falcon.decode([i]).endswith("\ufffd") for i in ids)
    sd = StreamDecoder(falcon)
    pieces = [sd.push(i) for i in ids]
    assert "" in pieces  # something was held back
    assert "".join(pieces) + sd.flush() == " 👨‍👩‍👧"


def test_stream_flush_emits_incomplete_tail(falcon: Tokenizer) -> None:
    ids = falcon.encode("ok 👍")[:-1]  # cut inside the emoji
    pieces = _stream(falcon, ids)
    assert "".join(pieces) == falcon.decode(ids)
    assert pieces[-1].endswith("\ufffd")


def test_stream_real_replacement_chars(falcon: Tokenizer) -> None:
    # A long run of genuine U+FFFD must not stall the stream (nor re-decode an ever-growing window).
    text = "x" + "\ufffd" * 100 + "y"
    ids = falcon.encode(text)
    pieces = _stream(falcon, ids)
    assert "".join(pieces) == text
    assert sum(len(p) for p in pieces[:-1]) > 50  # emitted along the way, not only at flush


def test_stream_garbage_bytes_stay_exact(falcon: Tokenizer) -> None:
    # A model can emit arbitrary byte tokens. Runs that keep ending in U+FFFD are released early (bounded window),
    # and must still add up to decode() exactly, also when a U+FFFD's bytes straddle the release point.
    from tokenizers import pre_tokenizers

    byte_ids = sorted(i for i in map(falcon.token_to_id, pre_tokenizers.ByteLevel.alphabet()) if i is not None)
    high = [i for i in byte_ids if falcon.decode([i]) == "\ufffd"]  # lone bytes >= 0x80
    assert len(high) > 100
    a, b = falcon.encode("\ufffd")  # U+FFFD is two tokens in Falcon's vocabulary
    rng = random.Random(0)
    cases = [[a] + [a, b] * 50, [b] + [a, b] * 50, [a, a, a] + [a, b] * 40 + [b, b, b]]
    cases += [[rng.choice(high + [a, b]) for _ in range(300)] for _ in range(5)]
    cases += [[rng.choice(high + falcon.encode("é👍🏽日本")) for _ in range(300)] for _ in range(5)]
    for ids in cases:
        sd = StreamDecoder(falcon)
        pieces = []
        for i in ids:
            pieces.append(sd.push(i))
            assert len(sd._ids) <= 64  # the decode window stays small
        assert "".join(pieces) + sd.flush() == falcon.decode(ids)


def test_stream_with_prompt(falcon: Tokenizer) -> None:
    text = VARIED[6] + " " + VARIED[3]
    ids = falcon.encode(text)
    for k in range(1, len(ids)):
        sd = StreamDecoder(falcon, ids[:k])
        out = "".join(sd.push(i) for i in ids[k:]) + sd.flush()
        prompt_text = falcon.decode(ids[:k])
        # A prompt cut inside a character decodes with a trailing U+FFFD; the stream emits the whole character.
        assert prompt_text.removesuffix("\ufffd") + out == text, k


# ------------------------------------------------------------------------------------------------------------------
# chat


CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
]


def test_falcon_instruct_fallback(falcon: Tokenizer) -> None:
    assert falcon.chat_template is None
    assert falcon.apply_chat_template(CONVERSATION) == (
        "You are a helpful assistant.\nUser: Hi!\nAssistant: Hello! How can I help?\nUser: Name a colour.\nAssistant:"
    )
    assert falcon.apply_chat_template(CONVERSATION[1:3], add_generation_prompt=False) == (
        "User: Hi!\nAssistant: Hello! How can I help?\n"
    )


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"content": "x"}], "role None"),
        ([{"role": "user", "content": 3}], "content must be a str"),
        (["hello"], "must be a dict"),
        ({"role": "user", "content": "x"}, "must be a list"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "only allowed first"),
    ],
)
def test_chat_validation(falcon: Tokenizer, messages, fragment: str) -> None:
    with pytest.raises(ChatTemplateError, match=fragment):
        falcon.apply_chat_template(messages)


# ------------------------------------------------------------------------------------------------------------------
# training (+ Jinja chat templates, on the small trained tokenizer)

TRAIN_TEXT = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak. Ünïcödé words, 日本語, and emoji 👍 appear too.",
    "def main():\n\tprint('hello')   # tabs and  spaces\n",
] * 20


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(TRAIN_TEXT, 400, out, special_tokens=("<|endoftext|>", ">>QUESTION<<"))
    return out


def test_train_bpe_round_trip(trained_dir: Path) -> None:
    tok = Tokenizer.from_dir(trained_dir)
    assert {p.name for p in trained_dir.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.special_ids == {0, 1}
    assert 256 < tok.vocab_size <= 400
    unseen = "Zebra ξ 🦒 \t\n  quietly <|endoftext|>"  # characters never seen in training still round-trip
    for text in TRAIN_TEXT[:3] + VARIED + [unseen]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert "".join(_stream(tok, ids)) == text
    assert len(tok.encode(TRAIN_TEXT[0])) < len(TRAIN_TEXT[0].encode()) / 2  # merges were learned


def test_train_bpe_loads_in_transformers(trained_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(trained_dir))
    tok = Tokenizer.from_dir(trained_dir)
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == tok.eos_token_id
    for text in TRAIN_TEXT[:3] + VARIED:
        ids = tok.encode(text)
        assert hf.encode(text) == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


def test_train_bpe_rejects_tiny_vocab(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], 100, tmp_path)


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}\n"
    "{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>\n"
    "{% else %}[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
)


def _with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_jinja_chat_template(trained_dir: Path, tmp_path: Path) -> None:
    d = _with_template(trained_dir, tmp_path / "tpl", TEMPLATE)
    tok = Tokenizer.from_dir(d)
    expected = (
        "<<SYS>>You are a helpful assistant.<</SYS>>\n"
        "[USER] Hi!<|endoftext|>\n"
        "[ASSISTANT] Hello! How can I help?<|endoftext|>\n"
        "[USER] Name a colour.<|endoftext|>\n"
    )
    assert tok.apply_chat_template(CONVERSATION) == expected + "[ASSISTANT]"
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=False) == expected
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    for gen in (True, False):
        assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=gen) == hf.apply_chat_template(
            CONVERSATION, add_generation_prompt=gen, tokenize=False
        )


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{{ messages.append(1) }}", "failed"),  # immutable sandbox
        ("{{ ''.__class__.__mro__ }}", "failed"),  # no attribute escapes
        ("{% for %}", "does not compile"),
    ],
)
def test_jinja_chat_template_errors(trained_dir: Path, tmp_path: Path, template: str, fragment: str) -> None:
    tok = Tokenizer.from_dir(_with_template(trained_dir, tmp_path / "tpl", template))
    with pytest.raises(ChatTemplateError, match=fragment):
        tok.apply_chat_template(CONVERSATION)


# ------------------------------------------------------------------------------------------------------------------
# loading errors


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path))):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "does-not-exist")


def test_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    train_bpe_tokenizer(TRAIN_TEXT, 300, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
