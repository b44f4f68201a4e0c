"""The HTTP app: TGI and OpenAI routes over one `Serving` engine, a chat page, metrics, auth.

Routes
    GET  /                      chat page (streaming, multi-turn, stop button)
    POST /                      TGI compat: `stream` picks /generate or /generate_stream (the `text-generation`
                                client calls this one)
    POST /generate              TGI: {"inputs", "parameters"} -> {"generated_text", "details"}
    POST /generate_stream       TGI: Server-Sent Events, one per token, the last with generated_text and details
    POST /tokenize              TGI: [{"id", "text", "start", "stop"}]
    GET  /info  /health  /metrics
    GET  /v1/models   POST /v1/completions   POST /v1/chat/completions     (OpenAI; `stream: true` for SSE)
    GET  /openapi.json  /docs

Errors: 422 (validation, naming the field), 429 (more than --max-waiting requests waiting), 401 (with --api-key,
every route but /health needs `Authorization: Bearer KEY`; a browser may give the key as the Basic-auth
password), 503 (shutting down). /v1/* answer in OpenAI's error shape, the rest in TGI's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..api import LLM
from ..runtime.engine import EngineConfig
from ..runtime.sampling import ParamError, SamplingParams
from ..tokenizer import ChatTemplateError
from .metrics import Metrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompatGenerateRequest,
    CompletionRequest,
    GenerateRequest,
    TGIParameters,
    TokenizeRequest,
    check_stops,
    openai_error,
    tgi_error,
    validation_error,
    walk_strings,
)
from .serving import Chunk, RequestCancelled, Serving
from .serving import Request as GenRequest

MAX_BODY_BYTES = 8 * 1024 * 1024
TGI_DEFAULT_MAX_NEW_TOKENS = 100
OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions

ROUTE_LABELS = {"/": "compat", "/generate": "generate", "/generate_stream": "generate_stream",
                "/tokenize": "tokenize", "/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}

_TGI_FINISH = {"eos": "eos_token", "length": "length", "stop": "stop_sequence"}
_OPENAI_FINISH = {"eos": "stop", "length": "length", "stop": "stop"}


@dataclass
class ServerConfig:
    model_name: str = "gyrfalcon"
    api_key: str | None = None
    max_waiting: int = 64
    engine: EngineConfig | None = None  # None: a pool of 256 MiB and the EngineConfig defaults
    otlp_endpoint: str | None = None


def route_label(path: str) -> str:
    return ROUTE_LABELS.get(path, "other")


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def error_response(path: str, err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    body = openai_error(err) if is_openai(path) else tgi_error(err)
    return JSONResponse(body, status_code=err.status, headers=headers)


# ---------------------------------------------------------------------------------------------------------------
# auth


class APIKeyMiddleware:
    """Every route but /health needs `Authorization: Bearer KEY` (or Basic auth with KEY as the password, which
    is what a browser sends after its login prompt on the chat page)."""

    def __init__(self, app: Any, api_key: str, metrics: Metrics):
        self.app = app
        self.key = api_key.encode()
        self.metrics = metrics

    def _authorized(self, header: bytes) -> bool:
        scheme, _, value = header.partition(b" ")
        value = value.strip()
        if scheme.lower() == b"bearer":
            return hmac.compare_digest(value, self.key)
        if scheme.lower() == b"basic":
            try:
                _, _, password = base64.b64decode(value, validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(password, self.key)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers", [])).get(b"authorization", b"")
        if self._authorized(header):
            return await self.app(scope, receive, send)
        path = scope["path"]
        self.metrics.count(route_label(path), "unauthorized")
        challenge = 'Basic realm="gyrfalcon", charset="UTF-8"' if path == "/" else 'Bearer realm="gyrfalcon"'
        err = APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", kind="unauthorized")
        response = error_response(path, err, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)


# ---------------------------------------------------------------------------------------------------------------
# body checks that must run before FastAPI parses the JSON


class CheckedRoute(APIRoute):
    """POST bodies must be at most MAX_BODY_BYTES of UTF-8 JSON whose strings are valid Unicode; anything else is
    a 422 (413 for size) naming the body or the field, before FastAPI's own parsing."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if request.method == "POST":
                body = await request.body()
                if len(body) > MAX_BODY_BYTES:
                    raise APIError(413, f"body: {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted",
                                   param="body")
                try:
                    text = body.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise APIError(422, f"body: invalid UTF-8 at byte {e.start}", param="body") from None
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise APIError(422, f"body: malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                                   param="body") from None
                bad = walk_strings(obj)
                if bad:
                    raise APIError(422, f"{bad[0]}: not valid Unicode text (an unpaired surrogate)", param=bad[0])
            return await handler(request)

        return checked


# ---------------------------------------------------------------------------------------------------------------
# the app


def create_app(llm: LLM, config: ServerConfig | None = None, *, tracer_provider: Any = None) -> FastAPI:
    config = config or ServerConfig()
    engine_config = config.engine or default_engine_config(llm, 256 * 1024 * 1024)
    metrics = Metrics()
    if tracer_provider is None and config.otlp_endpoint:
        from .tracing import make_tracer_provider

        tracer_provider = make_tracer_provider(config.otlp_endpoint)
    tracer = tracer_provider.get_tracer("gyrfalcon.server", __version__) if tracer_provider is not None else None
    serving = Serving(llm, engine_config, config.max_waiting, metrics, tracer)
    # Streams go on while a SIGTERM drains the server (sse-starlette's default is to cut every stream at the
    # signal); `gyrfalcon serve` cancels what still runs after --shutdown-timeout (Serving.cancel_all).
    AppStatus.disable_automatic_graceful_drain()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        serving.start()
        try:
            yield
        finally:
            await asyncio.to_thread(serving.stop)
            if tracer_provider is not None and hasattr(tracer_provider, "force_flush"):
                tracer_provider.force_flush()

    app = FastAPI(title="gyrfalcon", version=__version__, lifespan=lifespan,
                  description="Falcon and Falcon-Mamba served by gyrfalcon: TGI and OpenAI-compatible APIs.")
    app.router.route_class = CheckedRoute
    app.state.serving = serving
    app.state.metrics = metrics
    app.state.config = config
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key, metrics=metrics)
    api = _Handlers(llm, serving, metrics, config, engine_config)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError):
        outcome = {422: "invalid", 413: "invalid", 429: "rejected"}.get(err.status)
        if outcome:
            metrics.count(route_label(request.url.path), outcome)
        return error_response(request.url.path, err)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return await on_api_error(request, validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "not_found"}.get(exc.status_code, "validation")
        return error_response(request.url.path, APIError(exc.status_code, str(exc.detail), kind=kind))

    # ---- pages and service routes ----

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(api.chat_html())

    @app.get("/health", summary="200 while the engine runs, 503 otherwise (needs no API key)")
    async def health() -> Response:
        if serving.alive:
            return Response(status_code=200)
        return JSONResponse({"error": "the engine is not running", "error_type": "unavailable"}, status_code=503)

    @app.get("/info", summary="TGI: model and router information")
    async def info() -> dict:
        return api.info()

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.post("/tokenize", summary="TGI: the tokens of `inputs`")
    async def tokenize(body: TokenizeRequest) -> list:
        return api.tokenize(body.inputs)

    # ---- TGI ----

    @app.post("/generate", summary="TGI: generate")
    async def generate(body: GenerateRequest, request: Request) -> dict:
        return await api.tgi_generate(body, request, "generate")

    @app.post("/generate_stream", summary="TGI: generate, streamed as Server-Sent Events")
    async def generate_stream(body: GenerateRequest) -> EventSourceResponse:
        return api.tgi_stream(body, "generate_stream")

    @app.post("/", summary="TGI compat route: `stream` picks /generate (answered as a list) or /generate_stream")
    async def compat(body: CompatGenerateRequest, request: Request) -> Any:
        if body.stream:
            return api.tgi_stream(body, "compat")
        return [await api.tgi_generate(body, request, "compat")]

    # ---- OpenAI ----

    @app.get("/v1/models", summary="OpenAI: the served model")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": api.created,
                                            "owned_by": "gyrfalcon", "max_model_len": llm.max_context}]}

    @app.post("/v1/completions", summary="OpenAI: text completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await api.completions(body, request)

    @app.post("/v1/chat/completions", summary="OpenAI: chat completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await api.chat(body, request)

    return app


def default_engine_config(llm: LLM, kv_cache_bytes: int, block_size: int = 16, max_batch_size: int = 32,
                          max_batch_tokens: int = 512) -> EngineConfig:
    """An engine config whose pool takes `kv_cache_bytes` (at least one block)."""
    from ..runtime.engine import cache_block_bytes

    per_block = cache_block_bytes(llm.model, block_size)
    num_blocks = max(1, kv_cache_bytes // per_block)
    return EngineConfig(num_blocks=num_blocks, block_size=block_size, max_batch_size=max_batch_size,
                        max_batch_tokens=max(max_batch_tokens, max_batch_size))


# ---------------------------------------------------------------------------------------------------------------
# handlers


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Handlers:
    def __init__(self, llm: LLM, serving: Serving, metrics: Metrics, config: ServerConfig,
                 engine_config: EngineConfig):
        self.llm = llm
        self.serving = serving
        self.metrics = metrics
        self.config = config
        self.engine_config = engine_config
        self.created = int(time.time())
        self.special_ids = llm.tokenizer.special_ids
        self._html: str | None = None

    # ---- shared ----

    def chat_html(self) -> str:
        if self._html is None:
            self._html = resources.files("gyrfalcon.server").joinpath("static/chat.html").read_text("utf-8")
        return self._html

    def info(self) -> dict:
        ctx = self.llm.max_context
        return {
            "model_id": self.config.model_name, "model_sha": None, "model_dtype": str(self.llm.dtype).split(".")[-1],
            "model_device_type": self.llm.device.type, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": self.config.max_waiting + self.engine_config.max_batch_size,
            "max_best_of": 1, "max_stop_sequences": 16, "max_input_tokens": None if ctx is None else ctx - 1,
            "max_total_tokens": ctx, "max_batch_total_tokens": self.serving.capacity_tokens,
            "max_batch_prefill_tokens": self.engine_config.max_batch_tokens,
            "max_batch_size": self.engine_config.max_batch_size, "max_waiting_requests": self.config.max_waiting,
            "kv_cache_blocks": self.engine_config.num_blocks, "kv_block_size": self.engine_config.block_size,
            "validation_workers": 1, "max_client_batch_size": 16, "router": "gyrfalcon",
            "version": __version__, "sha": None, "docker_label": None,
        }

    def tokenize(self, text: str) -> list[dict]:
        enc = self.llm.tokenizer.backend.encode(text)
        return [{"id": i, "text": text[a:b], "start": a, "stop": b} for i, (a, b) in zip(enc.ids, enc.offsets,
                                                                                        strict=True)]

    def encode(self, prompt: str | list[int], field: str) -> list[int]:
        if isinstance(prompt, str):
            ids = self.llm.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.llm.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(422, f"`{field}`: token ids out of range [0, {vocab}): {bad[:5]}", param=field)
        if not ids:
            raise APIError(422, f"`{field}` is empty: at least one token is needed", param=field)
        return ids

    def max_new(self, prompt_len: int, asked: int | None, default: int | None, prompt_field: str,
                max_field: str) -> int:
        """Check prompt + max_new_tokens against the context and the cache; fill in a default."""
        limit = self.llm.max_context
        cap = self.serving.capacity_tokens
        if cap is not None:
            limit = cap if limit is None else min(limit, cap)
        where = "the model's context" if limit == self.llm.max_context else "the KV cache (--kv-cache-bytes)"
        if limit is not None and prompt_len >= limit:
            raise APIError(422, f"`{prompt_field}` has {prompt_len} tokens: it must be shorter than {where} of "
                           f"{limit} tokens", param=prompt_field)
        if asked is None:
            remaining = (limit - prompt_len) if limit is not None else None
            asked = default if default is not None else remaining
            if remaining is not None and asked is not None:
                asked = min(asked, remaining)
            if asked is None:
                asked = TGI_DEFAULT_MAX_NEW_TOKENS
        elif limit is not None and prompt_len + asked > limit:
            raise APIError(422, f"`{prompt_field}` tokens + `{max_field}` must be <= {where} of {limit} tokens; "
                           f"given {prompt_len} prompt tokens and {max_field}={asked}", param=max_field)
        return asked

    def sampling(self, field_prefix: str, **kwargs) -> SamplingParams:
        try:
            return SamplingParams(**kwargs)
        except ParamError as e:
            name = str(e).split("=", 1)[0]
            raise APIError(422, f"{field_prefix}{e}", param=field_prefix + name) from None

    def submit(self, route: str, ids: list[int], params: SamplingParams) -> GenRequest:
        return self.serving.submit(route, ids, params)

    async def collect(self, http: Request, req: GenRequest) -> list[list[Chunk]]:
        """Wait for the whole result; a client that hangs up cancels the request."""
        work = asyncio.ensure_future(self.serving.collect(req))
        gone = asyncio.ensure_future(_wait_disconnect(http))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                try:
                    return work.result()
                except RequestCancelled:
                    raise APIError(503, "the request was cancelled (the server is shutting down)",
                                   kind="unavailable") from None
                except RuntimeError as e:
                    raise APIError(500, str(e), kind="generation") from None
            raise APIError(499, "client closed the request", kind="cancelled")
        finally:
            gone.cancel()
            work.cancel()
            self.serving.cancel(req)

    async def merged(self, reqs: list[GenRequest]) -> AsyncIterator[tuple[int, list[Chunk]]]:
        """The chunks of several requests as they come: (request index, chunks)."""
        if len(reqs) == 1:
            async for chunks in self.serving.stream(reqs[0]):
                yield 0, chunks
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, req: GenRequest) -> None:
            try:
                async for chunks in self.serving.stream(req):
                    queue.put_nowait((i, chunks))
                queue.put_nowait((i, None))
            except BaseException as e:  # noqa: B036 - handed to the reader, which re-raises it
                queue.put_nowait((i, e))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(reqs)]
        try:
            left = len(reqs)
            while left:
                i, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    def token(self, c: Chunk) -> dict:
        special = c.token_id in self.special_ids
        text = self.llm.tokenizer.decode([c.token_id]) if special else c.text
        return {"id": c.token_id, "text": text, "logprob": c.logprob, "special": special}

    def token_text(self, token_id: int) -> str:
        """One token's own text (log-probability listings name tokens by it)."""
        return self.llm.tokenizer.decode([token_id])

    def top_tokens(self, c: Chunk) -> list[dict]:
        """TGI's top_tokens of one generated token: the most likely alternatives, best first."""
        return [{"id": i, "text": self.token_text(i), "logprob": lp, "special": i in self.special_ids}
                for i, lp in c.top_logprobs or ()]

    def completion_logprobs(self, chunks: list[Chunk], top: int, offset: int = 0) -> dict:
        """OpenAI /v1/completions' logprobs object for these tokens; text_offset counts from `offset`."""
        tokens, offsets = [], []
        for c in chunks:
            tokens.append(self.token_text(c.token_id))
            offsets.append(offset)
            offset += len(c.text)
        tops = [{self.token_text(i): lp for i, lp in c.top_logprobs or ()} for c in chunks] if top else None
        return {"tokens": tokens, "token_logprobs": [c.logprob for c in chunks], "top_logprobs": tops,
                "text_offset": offsets}

    def chat_logprobs(self, chunks: list[Chunk]) -> dict:
        """OpenAI /v1/chat/completions' logprobs object for these tokens."""
        def entry(token_id: int, logprob: float | None) -> dict:
            t = self.token_text(token_id)
            return {"token": t, "logprob": logprob, "bytes": list(t.encode("utf-8"))}

        return {"content": [{**entry(c.token_id, c.logprob),
                             "top_logprobs": [entry(i, lp) for i, lp in c.top_logprobs or ()]} for c in chunks],
                "refusal": None}

    # ---- TGI ----

    def tgi_start(self, body: GenerateRequest, route: str) -> GenRequest:
        p: TGIParameters = body.parameters
        p.check_supported()
        ids = self.encode(body.inputs, "inputs")
        if p.truncate is not None:
            ids = ids[-p.truncate :]
        max_new = self.max_new(len(ids), p.max_new_tokens, TGI_DEFAULT_MAX_NEW_TOKENS, "inputs",
                               "parameters.max_new_tokens")
        sampling = p.sampling
        params = self.sampling(
            "parameters.", max_new_tokens=max_new,
            temperature=(p.temperature if p.temperature is not None else 1.0) if sampling else 0.0,
            top_k=(p.top_k or 0) if sampling else 0, top_p=(p.top_p or 1.0) if sampling else 1.0,
            repetition_penalty=p.repetition_penalty or 1.0, seed=p.seed,
            stop=check_stops("parameters.stop", p.stop), logprobs=p.top_n_tokens or 0)
        return self.submit(route, ids, params)

    def _full_text(self, body: GenerateRequest, text: str) -> str:
        return body.inputs + text if body.parameters.return_full_text else text

    async def tgi_generate(self, body: GenerateRequest, http: Request, route: str) -> dict:
        req = self.tgi_start(body, route)
        (chunks,) = await self.collect(http, req)
        text = self._full_text(body, "".join(c.text for c in chunks))
        out: dict[str, Any] = {"generated_text": text}
        p = body.parameters
        if p.details or p.decoder_input_details:
            prefill = []
            if p.decoder_input_details:
                prefill = [{"id": i, "text": self.llm.tokenizer.decode([i]), "logprob": None}
                           for i in req.prompt_ids]
            out["details"] = {"finish_reason": _TGI_FINISH.get(chunks[-1].finish_reason, "length"),
                              "generated_tokens": len(chunks), "seed": req.seeds[0], "prefill": prefill,
                              "tokens": [self.token(c) for c in chunks],
                              "top_tokens": [self.top_tokens(c) for c in chunks] if p.top_n_tokens else None,
                              "best_of_sequences": None}
        return out

    def tgi_stream(self, body: GenerateRequest, route: str) -> EventSourceResponse:
        req = self.tgi_start(body, route)

        async def events() -> AsyncIterator[dict]:
            text, n = [], 0
            try:
                async for chunks in self.serving.stream(req):
                    for c in chunks:
                        text.append(c.text)
                        top = self.top_tokens(c) if body.parameters.top_n_tokens else None
                        event: dict[str, Any] = {"index": n, "token": self.token(c), "top_tokens": top,
                                                 "generated_text": None, "details": None}
                        n += 1
                        if c.finished:
                            event["generated_text"] = self._full_text(body, "".join(text))
                            event["details"] = {"finish_reason": _TGI_FINISH.get(c.finish_reason, "length"),
                                                "generated_tokens": n, "seed": req.seeds[0],
                                                "input_length": len(req.prompt_ids)}
                        yield {"data": json.dumps(event, ensure_ascii=False)}
            except (RuntimeError, RequestCancelled) as e:
                yield {"data": json.dumps({"error": str(e), "error_type": "generation"})}
            finally:
                self.serving.cancel(req)

        return EventSourceResponse(events(), sep="\n", ping=15)

    # ---- OpenAI ----

    def openai_params(self, body, max_new: int, stops: tuple[str, ...], logprobs: int | None) -> SamplingParams:
        return self.sampling(
            "", max_new_tokens=max_new, temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p,
            repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed, stop=stops,
            ignore_eos=body.ignore_eos, num_return_sequences=body.num_choices, logprobs=logprobs)

    def submit_all(self, route: str, prompts: list[list[int]], params: list[SamplingParams]) -> list[GenRequest]:
        reqs: list[GenRequest] = []
        try:
            for ids, p in zip(prompts, params, strict=True):
                reqs.append(self.submit(route, ids, p))
        except APIError:
            for r in reqs:
                self.serving.cancel(r)
            raise
        return reqs

    @staticmethod
    def usage(reqs: list[GenRequest]) -> dict:
        prompt = sum(len(r.prompt_ids) for r in reqs)
        completion = sum(sum(r.generated) for r in reqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def completions(self, body: CompletionRequest, http: Request) -> Any:
        body.check_supported()
        raw = body.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise APIError(422, "`prompt` is empty", param="prompt")
        if len(raw) > 16:
            raise APIError(422, f"`prompt` holds {len(raw)} prompts; at most 16 are allowed", param="prompt")
        ids = [self.encode(p, "prompt") for p in raw]
        stops = check_stops("stop", body.stop)
        params = [self.openai_params(body, self.max_new(len(i), body.max_tokens,
                                                        OPENAI_COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt",
                                                        "max_tokens"), stops, body.logprobs) for i in ids]
        reqs = self.submit_all("completions", ids, params)
        rid, created, n = "cmpl-" + reqs[0].id, int(time.time()), body.num_choices
        echo = [(p if isinstance(p, str) else self.llm.tokenizer.decode(p)) if body.echo else "" for p in raw]

        def chunk(choices: list[dict]) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": self.config.model_name,
                    "system_fingerprint": f"gyrfalcon-{__version__}", "choices": choices}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            offsets = [0] * (len(reqs) * n)

            async def events() -> AsyncIterator[dict]:
                try:
                    if body.echo:
                        for i, e in enumerate(echo):
                            for j in range(n):
                                yield {"data": json.dumps(chunk([{"index": i * n + j, "text": e, "logprobs": None,
                                                                  "finish_reason": None}]))}
                    async for i, chunks in self.merged(reqs):
                        for c in chunks:
                            lp = None
                            if body.logprobs is not None:
                                lp = self.completion_logprobs([c], body.logprobs, offsets[i * n + c.seq])
                                offsets[i * n + c.seq] += len(c.text)
                            choice = {"index": i * n + c.seq, "text": c.text, "logprobs": lp,
                                      "finish_reason": _OPENAI_FINISH.get(c.finish_reason) if c.finished else None}
                            yield {"data": json.dumps(chunk([choice]), ensure_ascii=False)}
                    if include_usage:
                        yield {"data": json.dumps({**chunk([]), "usage": self.usage(reqs)})}
                    yield {"data": "[DONE]"}
                except (RuntimeError, RequestCancelled) as e:
                    yield {"data": json.dumps(openai_error(APIError(500, str(e), kind="generation")))}
                finally:
                    for r in reqs:
                        self.serving.cancel(r)

            return EventSourceResponse(events(), sep="\n", ping=15)

        results = await self._collect_all(http, reqs)
        choices = []
        for i, per_seq in enumerate(results):
            for j, chunks in enumerate(per_seq):
                lp = None if body.logprobs is None else self.completion_logprobs(chunks, body.logprobs)
                choices.append({"index": i * n + j, "text": echo[i] + "".join(c.text for c in chunks),
                                "logprobs": lp, "finish_reason": _OPENAI_FINISH.get(chunks[-1].finish_reason)})
        return {**chunk(choices), "usage": self.usage(reqs)}

    async def _collect_all(self, http: Request, reqs: list[GenRequest]) -> list[list[list[Chunk]]]:
        if len(reqs) == 1:
            return [await self.collect(http, reqs[0])]
        try:
            return list(await asyncio.gather(*(self.collect(http, r) for r in reqs)))
        finally:
            for r in reqs:
                self.serving.cancel(r)

    async def chat(self, body: ChatCompletionRequest, http: Request) -> Any:
        body.check_supported()
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt = self.llm.chat_prompt(messages)
        except ChatTemplateError as e:
            raise APIError(422, f"messages: {e}", param="messages") from None
        ids = self.encode(prompt, "messages")
        stops = check_stops("stop", body.stop)
        if self.llm.tokenizer.chat_template is None:
            stops += ("\nUser:",)  # the Falcon-instruct form: stop where the user's next turn would begin
        max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_new = self.max_new(len(ids), body.max_new, None, "messages", max_field)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        (req,) = self.submit_all("chat_completions", [ids], [self.openai_params(body, max_new, stops, logprobs)])
        rid, created, n = "chatcmpl-" + req.id, int(time.time()), body.num_choices
        base = {"id": rid, "object": "chat.completion", "created": created, "model": self.config.model_name,
                "system_fingerprint": f"gyrfalcon-{__version__}"}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            head = {**base, "object": "chat.completion.chunk"}

            def delta(j: int, content: str | None, finish: str | None, lp: dict | None = None) -> dict:
                d = {"role": "assistant", "content": content, "tool_calls": None}
                return {**head, "choices": [{"index": j, "delta": d, "logprobs": lp, "finish_reason": finish}]}

            async def events() -> AsyncIterator[dict]:
                try:
                    for j in range(n):
                        yield {"data": json.dumps(delta(j, "", None))}
                    async for _, chunks in self.merged([req]):
                        for c in chunks:
                            if logprobs is not None:  # every token has its entry, text or not (yet)
                                yield {"data": json.dumps(delta(c.seq, c.text, None, self.chat_logprobs([c])),
                                                          ensure_ascii=False)}
                            elif c.text:
                                yield {"data": json.dumps(delta(c.seq, c.text, None), ensure_ascii=False)}
                            if c.finished:
                                yield {"data": json.dumps(delta(c.seq, None, _OPENAI_FINISH.get(c.finish_reason)))}
                    if include_usage:
                        yield {"data": json.dumps({**head, "choices": [], "usage": self.usage([req])})}
                    yield {"data": "[DONE]"}
                except (RuntimeError, RequestCancelled) as e:
                    yield {"data": json.dumps(openai_error(APIError(500, str(e), kind="generation")))}
                finally:
                    self.serving.cancel(req)

            return EventSourceResponse(events(), sep="\n", ping=15)

        per_seq = await self.collect(http, req)
        choices = [{"index": j, "message": {"role": "assistant", "content": "".join(c.text for c in chunks)},
                    "logprobs": None if logprobs is None else self.chat_logprobs(chunks),
                    "finish_reason": _OPENAI_FINISH.get(chunks[-1].finish_reason)}
                   for j, chunks in enumerate(per_seq)]
        return {**base, "choices": choices, "usage": self.usage([req])}
