"""Tokenization: a thin wrapper over the Hugging Face `tokenizers` library.

Everything that touches BPE itself (merges, byte-level mapping, added/special tokens) is delegated to
`tokenizers.Tokenizer`, loaded from the checkpoint's ``tokenizer.json``. This module adds only what a runtime needs
around it:

* `Tokenizer.from_dir` reads ``tokenizer.json`` plus the optional side files (``tokenizer_config.json``,
  ``special_tokens_map.json``, ``config.json``, ``chat_template.jinja``) for the eos/bos/pad tokens and the chat
  template;
* `Tokenizer.apply_chat_template` renders a conversation to a prompt string (the checkpoint's Jinja template in a
  sandbox, else the Falcon-instruct "User:/Assistant:" form);
* `StreamDecoder` turns generated ids into text incrementally without ever emitting half a UTF-8 character;
* `train_bpe_tokenizer` trains a small Falcon-style byte-level BPE (used for the bundled default model).

Decoding never applies transformers' ``clean_up_tokenization_spaces`` (Falcon's config does not set it, and
transformers >= 5 ignores it for BPE), so `decode` is exactly `tokenizers`' decode, which is what
`transformers.AutoTokenizer` returns for Falcon.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = [
    "ChatTemplateError",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "train_bpe_tokenizer",
]

CHAT_ROLES = ("system", "user", "assistant")
_REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """A tokenizer directory or file that cannot be loaded, or a request the tokenizer cannot serve."""


class ChatTemplateError(TokenizerError):
    """Malformed chat messages, or a chat template that fails to render."""


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a plain string or a serialized AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON side file: {} when absent, a TokenizerError naming the file when unreadable."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _first_id(value: Any) -> int | None:
    """config.json's eos/bos/pad ids may be an int, a list of ints (several stop tokens) or null."""
    if isinstance(value, bool):  # bool is an int subclass; a bool here is a broken config, not an id
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value and isinstance(value[0], int) and not isinstance(value[0], bool):
        return value[0]
    return None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template a runtime needs.

    Build it with `Tokenizer.from_dir` (a checkpoint directory) or directly from a `tokenizers.Tokenizer`.
    Padding and truncation configured inside tokenizer.json are switched off: callers always get every id.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        eos_token_id: int | None = None,
        bos_token_id: int | None = None,
        pad_token_id: int | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        source: Path | None = None,
    ) -> None:
        self._tok = backend
        # A tokenizer.json may carry padding/truncation settings meant for training pipelines; silently padding or
        # truncating a prompt would be a correctness bug here.
        self._tok.no_padding()
        self._tok.no_truncation()
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.source = source
        self._eos_id = self._resolve(eos_token, eos_token_id, "eos")
        self._bos_id = self._resolve(bos_token, bos_token_id, "bos")
        self._pad_id = self._resolve(pad_token, pad_token_id, "pad")
        self._special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self._compiled_template: tuple[str, Any] | None = None

    def _resolve(self, token: str | None, token_id: int | None, what: str) -> int | None:
        """A named token wins (that is what transformers does); a bare id from config.json is the fallback."""
        if token is not None:
            tid = self._tok.token_to_id(token)
            if tid is None:
                raise TokenizerError(f"{what}_token {token!r} is not in the vocabulary{self._where()}")
            return tid
        if token_id is not None:
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"{what}_token_id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
            return token_id
        return None

    def _where(self) -> str:
        return f" of {self.source}" if self.source is not None else ""

    # ----------------------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (required) and the optional side files from a checkpoint directory.

        Special tokens are looked up, in order, in tokenizer_config.json, special_tokens_map.json and config.json
        (``eos_token_id`` / ``bos_token_id`` / ``pad_token_id``); eos falls back to ``<|endoftext|>`` when the
        vocabulary has it. The chat template comes from tokenizer_config.json's ``chat_template`` or, as newer
        transformers save it, a ``chat_template.jinja`` file. A path to tokenizer.json itself is also accepted.
        """
        path = Path(path)
        directory = path.parent if path.is_file() else path
        tok_file = directory / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {directory} (looked for {tok_file})")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON or unknown components
            raise TokenizerError(f"cannot load {tok_file}: {e}") from e

        tok_config = _read_json(directory / "tokenizer_config.json")
        special_map = _read_json(directory / "special_tokens_map.json")
        model_config = _read_json(directory / "config.json")

        def named(key: str) -> str | None:
            for source in (tok_config, special_map):
                content = _token_content(source.get(key))
                if content is not None:
                    return content
            return None

        eos_token = named("eos_token")
        eos_token_id = _first_id(model_config.get("eos_token_id"))
        if eos_token is None and eos_token_id is None and backend.token_to_id("<|endoftext|>") is not None:
            eos_token = "<|endoftext|>"

        chat_template = tok_config.get("chat_template")
        if isinstance(chat_template, list):
            # Older transformers store several named templates; "default" is the one apply_chat_template uses.
            by_name = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, Mapping)}
            chat_template = by_name.get("default")
        if chat_template is None and (directory / "chat_template.jinja").is_file():
            chat_template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TokenizerError(f"chat_template in {directory / 'tokenizer_config.json'} must be a string")

        max_len = tok_config.get("model_max_length")
        # transformers writes a huge sentinel (int(1e30)) for "unknown"; that is not a usable length.
        model_max_length = max_len if isinstance(max_len, int) and 0 < max_len < 10**9 else None

        return cls(
            backend,
            eos_token=eos_token,
            bos_token=named("bos_token"),
            pad_token=named("pad_token"),
            eos_token_id=eos_token_id,
            bos_token_id=_first_id(model_config.get("bos_token_id")),
            pad_token_id=_first_id(model_config.get("pad_token_id")),
            chat_template=chat_template,
            model_max_length=model_max_length,
            source=directory,
        )

    # ----------------------------------------------------------------------------------------------------------
    # encode / decode

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. ``<|endoftext|>``) map to their ids.

        `add_special_tokens` only matters when tokenizer.json has a post-processor (Falcon's has none).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts at once (parallel inside `tokenizers`)."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects str items, got {type(t).__name__}")
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (bytes that do not form valid UTF-8 come out as U+FFFD)."""
        # int() accepts numpy/torch scalars, which the Rust binding would reject.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (byte-level form, e.g. "ĠHello"), or None."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id (byte-level form), or None when out of range."""
        return self._tok.id_to_token(int(token_id))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_id

    @property
    def eos_token(self) -> str | None:
        return None if self._eos_id is None else self._tok.id_to_token(self._eos_id)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def bos_token(self) -> str | None:
        return None if self._bos_id is None else self._tok.id_to_token(self._bos_id)

    @property
    def pad_token_id(self) -> int | None:
        """The pad id, or the eos id when none is configured (Falcon has no pad token)."""
        return self._pad_id if self._pad_id is not None else self._eos_id

    @property
    def pad_token(self) -> str | None:
        pad = self.pad_token_id
        return None if pad is None else self._tok.id_to_token(pad)

    @property
    def special_ids(self) -> set[int]:
        """Ids of the added tokens marked special (the ones `skip_special_tokens` drops), plus eos/bos."""
        ids = set(self._special_ids)
        ids.update(i for i in (self._eos_id, self._bos_id) if i is not None)
        return ids

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, bos={self.bos_token!r}, "
            f"chat_template={'jinja' if self.chat_template else 'falcon-instruct'}, source={self.source})"
        )

    # ----------------------------------------------------------------------------------------------------------
    # chat

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render a conversation to the prompt string the model was tuned on.

        `messages` is a list of ``{"role": "system" | "user" | "assistant", "content": str}`` dicts; anything else
        raises `ChatTemplateError`.

        If the tokenizer has a ``chat_template`` it is rendered with Jinja in an `ImmutableSandboxedEnvironment`
        (as transformers does: trim_blocks, lstrip_blocks, loop controls, a non-escaping ``tojson``), with the
        variables ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``pad_token`` (those that
        are set) and the functions ``raise_exception(msg)`` and ``strftime_now(fmt)``.

        Otherwise the Falcon-instruct form is used. A system message may only come first and becomes its own
        line(s); every user turn is ``"User: {content}\\n"`` and every assistant turn ``"Assistant: {content}\\n"``;
        with `add_generation_prompt` the string ends with ``"Assistant:"`` (no trailing space or newline, so that
        the model's first token carries its own leading space). For example::

            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]

        renders to ``"Be brief.\\nUser: Hi\\nAssistant: Hello!\\nUser: Name a colour.\\nAssistant:"``.
        """
        _validate_messages(messages)
        if self.chat_template is not None:
            return self._render_jinja(messages, add_generation_prompt)
        return _falcon_instruct_prompt(messages, add_generation_prompt)

    def _render_jinja(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        import jinja2  # lazy: only checkpoints that ship a template need it

        # Cached with its source, so that assigning a new `chat_template` takes effect.
        if self._compiled_template is None or self._compiled_template[0] != self.chat_template:
            try:
                self._compiled_template = (self.chat_template, _jinja_environment().from_string(self.chat_template))
            except jinja2.TemplateError as e:
                raise ChatTemplateError(f"chat_template{self._where()} does not compile: {e}") from e
        context: dict[str, Any] = {
            # Plain copies: the template must not see (or, were the sandbox to fail, mutate) the caller's objects.
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
        }
        # Like transformers, unset special tokens are simply absent (Jinja renders an undefined as "").
        # pad_token is passed only when configured, not as the eos fallback `pad_token_id` uses.
        for name, tid in (("bos_token", self._bos_id), ("eos_token", self._eos_id), ("pad_token", self._pad_id)):
            if tid is not None:
                context[name] = self._tok.id_to_token(tid)
        try:
            return self._compiled_template[1].render(**context)
        except jinja2.TemplateError as e:  # raise_exception(), SecurityError, undefined calls ...
            raise ChatTemplateError(f"chat_template{self._where()} failed: {e}") from e


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise ChatTemplateError(f"messages[{i}] has role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"messages[{i}] content must be a str, got {type(m.get('content')).__name__}")


def _falcon_instruct_prompt(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    parts: list[str] = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            if i != 0:
                raise ChatTemplateError(f"messages[{i}]: a system message is only allowed first")
            parts.append(f"{content}\n")
        elif role == "user":
            parts.append(f"User: {content}\n")
        else:
            parts.append(f"Assistant: {content}\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


_JINJA_ENV: Any = None


def _jinja_environment() -> Any:
    """The sandboxed environment chat templates run in (built once; it holds no per-template state)."""
    global _JINJA_ENV
    if _JINJA_ENV is not None:
        return _JINJA_ENV
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(jinja2.ext.Extension):
        # transformers marks assistant spans with {% generation %}...{% endgeneration %} to build training masks;
        # for rendering a prompt the tag is transparent, but the template must still parse.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)  # the 'generation' name token
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return body

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        # Jinja's own tojson HTML-escapes (<, >, &, '), which would corrupt prompts; match transformers instead.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    _JINJA_ENV = env
    return env


# --------------------------------------------------------------------------------------------------------------
# streaming detokenization

# Prompt ids kept as left context when seeding (enough for any decoder that looks at neighbours, e.g. a
# SentencePiece-style leading-space rule; byte-level BPE needs none).
_SEED_CONTEXT = 5
# Safety valve for garbage: a model can emit long runs of invalid bytes (or real U+FFFD), whose decode keeps ending
# in U+FFFD. Holding all of them would re-decode an ever-growing window on every push, so after this many held
# tokens the held text is released up to a token boundary that is provably on a character boundary (see
# `_release`). Well-formed text never holds this long: a character is at most 4 bytes, so at most 4 tokens.
_MAX_HELD_TOKENS = 32
# How many of the latest token boundaries `_release` tries; some boundary among any 4 consecutive ones is not
# strictly inside a (<= 4-byte) character.
_RELEASE_CANDIDATES = 4


def _text_after(prefix: str, text: str) -> str:
    """`text` minus its head that `prefix` already covered."""
    if text.startswith(prefix):  # the normal case: the emitted prefix decodes identically inside the longer window
        return text[len(prefix) :]
    # Only when seeded with a prompt that ends inside a character: its trailing U+FFFD has now become the real
    # character, which belongs to the new text. Emit from where the two strings diverge.
    common = 0
    for a, b in zip(prefix, text, strict=False):
        if a != b:
            break
        common += 1
    return text[common:]


class StreamDecoder:
    """Incremental detokenizer: `push` one generated id at a time, get back the newly completed text.

    Byte-level BPE can split one multi-byte character across several tokens, so decoding a token on its own may
    end in U+FFFD. This keeps a small window of ids: a prefix (already emitted, kept as left context) and the held
    ids after ``read``. Each push decodes only that window; if the text ends in U+FFFD the new ids are held back,
    otherwise the text beyond the decoded prefix is emitted and the window slides forward to start at the old
    ``read``. This is the prefix-offset technique of TGI and transformers' TextStreamer, made exact: the
    concatenation of every `push` and the final `flush` equals ``tokenizer.decode(all pushed ids)``, and no pushed
    piece contains a U+FFFD that is not in that decode. Per push it decodes a handful of ids, independent of the
    length of the stream.

    `prompt_ids` seed the left context (the last few are kept) so the first generated token is decoded as a
    continuation of the prompt; the output is then exactly the text that generation appends to the prompt. If the
    prompt ends in the middle of a character (its decode ends in U+FFFD), that character is emitted whole once
    generation completes it, i.e. the output continues ``decode(prompt_ids)`` minus that U+FFFD.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, *, skip_special_tokens: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [int(i) for i in (prompt_ids or [])][-_SEED_CONTEXT:]
        self._read = len(self._ids)  # ids[:read] are emitted (or prompt context); ids[read:] are held
        self._prefix_text = self._decode(self._ids)
        self._pushed = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still incomplete)."""
        self._ids.append(int(token_id))
        self._pushed = True
        text = self._decode(self._ids)
        if not text.endswith(_REPLACEMENT_CHAR):
            return self._emit_through(len(self._ids), text)
        if len(self._ids) - self._read >= _MAX_HELD_TOKENS:
            return self._release(text)
        return ""

    def flush(self) -> str:
        """Emit whatever is held (an incomplete character comes out as U+FFFD, as `decode` would give it)."""
        if not self._pushed or self._read == len(self._ids):
            return ""
        return self._emit_through(len(self._ids), self._decode(self._ids))

    def _emit_through(self, k: int, text_k: str) -> str:
        """Emit the text of window ids[:k] (`text_k`) beyond the prefix; ids[read:k] become the new prefix."""
        new = _text_after(self._prefix_text, text_k)
        start = self._read
        self._ids = self._ids[start:]  # older ids are dropped: they are no longer needed as context
        self._read = k - start
        self._prefix_text = self._decode(self._ids[: self._read])
        return new

    def _release(self, text: str) -> str:
        """Emit held garbage up to a token boundary k where nothing can change any more.

        If decode(ids[:k]) + decode(ids[k:]) equals decode(ids) (`text`), k is a reset point of the UTF-8 decoder:
        splitting inside a character (or inside a maximal invalid subsequence) would turn its pieces into at least
        one extra U+FFFD. Text before a reset point is final whatever comes next, so emitting it keeps the stream
        exact.
        """
        n = len(self._ids)
        for k in range(n - 1, max(self._read, n - 1 - _RELEASE_CANDIDATES), -1):
            left = self._decode(self._ids[:k])
            if left + self._decode(self._ids[k:]) == text:
                return self._emit_through(k, left)
        # Not reached for byte-level BPE; a decoder we cannot reason about gets everything (exactness not assured).
        return self._emit_through(n, text)


# --------------------------------------------------------------------------------------------------------------
# training


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: Path,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    *,
    model_max_length: int = 2048,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a Falcon-style byte-level BPE on `texts` and save it to `out_dir`; return it loaded from there.

    Byte-level pre-tokenizer without a prefix space and a byte-level decoder, like Falcon's tokenizer. All 256
    byte symbols are in the base alphabet, so any text encodes (no unknown token) and ``decode(encode(x)) == x``.
    `special_tokens` get the first ids (0, 1, ...); the first one is the eos token. Writes ``tokenizer.json``,
    ``tokenizer_config.json`` and ``special_tokens_map.json`` so that `transformers.AutoTokenizer` loads the
    directory too.
    """
    special_tokens = list(special_tokens)
    if not special_tokens:
        raise TokenizerError("train_bpe_tokenizer needs at least one special token (the first is the eos token)")
    if len(set(special_tokens)) != len(special_tokens):
        raise TokenizerError(f"duplicate special tokens: {special_tokens}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise TokenizerError(
            f"vocab_size {vocab_size} is smaller than the byte alphabet ({len(alphabet)}) plus "
            f"{len(special_tokens)} special token(s)"
        )

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    eos = special_tokens[0]
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    special_map: dict[str, Any] = {"eos_token": eos}
    if len(special_tokens) > 1:
        special_map["additional_special_tokens"] = special_tokens[1:]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    return Tokenizer.from_dir(out_dir)
