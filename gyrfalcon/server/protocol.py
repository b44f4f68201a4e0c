"""Request schemas of the two HTTP APIs the server speaks (TGI and OpenAI), and their error shapes.

Every request model forbids unknown fields and is strict about types (a string is not a number, 1.0 is not an
integer, NaN is not a temperature), so a malformed request is answered 422 with the offending field named,
before anything reaches the engine. Fields that the APIs define but this server does not implement are
accepted when they hold their neutral value (what clients send by default: null, false, 0) and refused,
naming the field, otherwise.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # sequences per request (n / best_of)
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 512
MAX_NEW_TOKENS = 1_000_000
MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20  # alternatives per token (SamplingParams.logprobs allows as many)


class APIError(Exception):
    """An error answered with `status`; `param` names the offending field (None when none is at fault)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "validation"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind  # validation | overloaded | generation | unauthorized | not_found | unavailable


def unsupported(field: str, why: str = "") -> APIError:
    return APIError(422, f"`{field}` is not supported by this server{': ' + why if why else ''}", param=field)


def tgi_error(err: APIError) -> dict:
    """TGI's shape: {"error": message, "error_type": kind}."""
    return {"error": err.message, "error_type": err.kind}


_OPENAI_TYPES = {"validation": "invalid_request_error", "overloaded": "rate_limit_exceeded",
                 "unauthorized": "authentication_error", "not_found": "not_found_error",
                 "generation": "server_error", "unavailable": "server_error"}


def openai_error(err: APIError) -> dict:
    """OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": err.message, "type": _OPENAI_TYPES.get(err.kind, "server_error"),
                      "param": err.param, "code": None if err.status >= 500 else err.kind}}


_FIELD_PART = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def field_path(loc: tuple | list) -> str:
    """A pydantic error location as the field a user wrote: ('body', 'parameters', 'top_p') -> parameters.top_p.
    Union-member tags that pydantic inserts ('str', 'list[int]', 'ChatMessage') are dropped."""
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif isinstance(p, str) and _FIELD_PART.match(p) and p not in _TYPE_TAGS:
            parts.append(("." if parts else "") + p)
    path = "".join(parts)
    if path.startswith("body"):
        path = path[4:].lstrip(".")
    return path or "body"


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic error, as a 422 that names its field (the others are counted)."""
    first = errors[0]
    field = field_path(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        field, msg = "body", f"malformed JSON: {first.get('ctx', {}).get('error', msg)}"
    elif first.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif first.get("type") == "missing":
        msg = "field required"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return APIError(422, f"{field}: {msg}{more}", param=field)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)



def check_stops(field: str, stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP:
        raise APIError(422, f"`{field}` holds {len(stops)} strings; at most {MAX_STOP} are allowed", param=field)
    for s in stops:
        if not s:
            raise APIError(422, f"`{field}` strings must not be empty", param=field)
        if len(s) > MAX_STOP_CHARS:
            raise APIError(422, f"`{field}` strings are at most {MAX_STOP_CHARS} characters", param=field)
    return tuple(stops)


# ---------------------------------------------------------------------------------------------------------------
# TGI


class TGIParameters(Strict):
    """TGI's `parameters` object (text-generation-inference GenerateParameters)."""

    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=0, le=MAX_NEW_TOKENS)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    return_full_text: bool | None = False
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    temperature: float | None = Field(None, gt=0, le=100)
    top_k: int | None = Field(None, gt=0, le=1_000_000)
    top_p: float | None = Field(None, gt=0, le=1)
    truncate: int | None = Field(None, gt=0)
    typical_p: float | None = Field(None, gt=0, le=1)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    grammar: dict[str, Any] | None = None
    adapter_id: str | None = None

    def check_supported(self) -> None:
        if self.best_of not in (None, 1):
            raise unsupported("parameters.best_of", "only 1 sequence per request")
        if self.watermark:
            raise unsupported("parameters.watermark")
        if self.typical_p not in (None, 1.0):
            raise unsupported("parameters.typical_p")
        if self.grammar is not None:
            raise unsupported("parameters.grammar")
        if self.adapter_id is not None:
            raise unsupported("parameters.adapter_id")
        if self.frequency_penalty not in (None, 0.0):
            raise unsupported("parameters.frequency_penalty", "use repetition_penalty")

    @property
    def sampling(self) -> bool:
        """TGI samples when asked to, or when any sampling knob moves away from its neutral value."""
        return bool(self.do_sample or (self.temperature is not None and self.temperature != 1.0)
                    or self.top_k or (self.top_p is not None and self.top_p < 1.0))


class GenerateRequest(Strict):
    """POST /generate and /generate_stream."""

    inputs: str = Field(min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)


class CompatGenerateRequest(GenerateRequest):
    """POST / (what the `text-generation` client calls): `stream` picks /generate or /generate_stream."""

    stream: bool = False


class TokenizeRequest(Strict):
    inputs: str = Field(min_length=1)
    parameters: TGIParameters | None = None


# ---------------------------------------------------------------------------------------------------------------
# OpenAI


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _OpenAISampling(Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N, description="sequences to generate (default 1)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # gyrfalcon (and vLLM/TGI) extensions
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    ignore_eos: bool = False

    @property
    def num_choices(self) -> int:
        return self.n or 1

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise unsupported(name, "use repetition_penalty")
        if self.logit_bias:
            raise unsupported("logit_bias")


class CompletionRequest(_OpenAISampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None and self.echo:
            raise unsupported("logprobs", "not with `echo` (the prompt's log-probabilities are not computed)")
        if self.best_of is not None and self.best_of != self.num_choices:
            raise unsupported("best_of", "it must equal n")
        if self.suffix:
            raise unsupported("suffix")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_OpenAISampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, le=MAX_NEW_TOKENS)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(422, "`top_logprobs` needs `logprobs: true`", param="top_logprobs")
        if self.tools:
            raise unsupported("tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice")
        if self.response_format not in (None, {"type": "text"}):
            raise unsupported("response_format")
        for i, m in enumerate(self.messages):
            if m.tool_calls:
                raise unsupported(f"messages[{i}].tool_calls")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise APIError(422, "give `max_tokens` or `max_completion_tokens`, not both", param="max_completion_tokens")

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def walk_strings(obj: Any, path: str = "") -> tuple[str, str] | None:
    """The first string in a parsed JSON body that is not valid Unicode text (a lone surrogate, which JSON's
    \\ud800 escapes can smuggle in), as (field path, string); None when all are fine."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad = walk_strings(k, path) or walk_strings(v, f"{path}.{k}" if path else str(k))
            if bad:
                return bad
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad = walk_strings(v, f"{path}[{i}]")
            if bad:
                return bad
    return None
