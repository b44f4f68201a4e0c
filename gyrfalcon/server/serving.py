"""The engine in a thread of its own, and requests that come and go from the HTTP event loop.

HTTP handlers (asyncio) `submit` requests and read their tokens from an asyncio queue; one engine thread adds
them to the `Engine`, steps it while there is work (the model releases the GIL while it computes) and hands each
step's tokens back with `loop.call_soon_threadsafe`. Text is made in the engine thread, right after the step, by
the same rules as `LLM.generate`: incremental detokenization, stop strings held back until they cannot match,
and a sequence that reaches a stop string ends before the next step. So a request's tokens are the tokens
`llm.generate` gives for the same prompt, seed and parameters, whatever else is running.

Cancellation (a client went away, a shutdown ran out of time) ends the request's sequences before the next step,
which frees their blocks at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..api import LLM
from ..runtime.engine import Engine, EngineConfig, TokenEvent
from ..runtime.sampling import SamplingParams
from ..text_stream import TextState
from ..tokenizer import StreamDecoder
from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("gyrfalcon.server")


@dataclass
class Chunk:
    """One generated token of sequence `seq` (0..n-1) of a request, with the text it completes."""

    seq: int
    token_id: int
    text: str
    finished: bool = False
    finish_reason: str | None = None  # eos | length | stop | cancelled
    logprob: float | None = None  # when the request asked for logprobs (SamplingParams.logprobs)
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(eq=False)
class Request:
    route: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    seq_ids: list[int] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)
    texts: list[TextState] = field(default_factory=list)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)  # tokens per sequence
    finish_reasons: list[str | None] = field(default_factory=list)
    # perf_counter times for metrics; time_ns times for spans
    t_arrival: float = field(default_factory=time.perf_counter)
    ns_arrival: int = field(default_factory=time.time_ns)
    ns_scheduled: int | None = None
    t_first: float | None = None
    ns_first: int | None = None
    t_last: list[float] = field(default_factory=list)
    done: bool = False
    cancelled: bool = False
    error: str | None = None

    @property
    def n(self) -> int:
        return self.params.num_return_sequences


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; elsewhere there is none and trimming is a no-op
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc `malloc_trim`).

    Every step allocates and frees tensors whose shapes follow the batch (gathered KV rows, logits, padded ids),
    which glibc serves from its heaps and keeps when they are freed. Trimming when the batch empties returns
    those pages (measured on an engine-only load test: 36 MiB of 549 after a round). It is not the whole story of
    the server's RSS growth under repeated load (see the README's load test). It costs a walk of the heap, a few
    milliseconds, and happens only when no request is running."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class RequestCancelled(Exception):
    """Put in a request's queue when it was cancelled, so that a reader still waiting on it wakes up."""


class Overloaded(APIError):
    def __init__(self, waiting: int):
        super().__init__(429, f"the server is busy: {waiting} requests are already waiting; retry later",
                         kind="overloaded")


class Serving:
    """Owns the engine and its thread. `submit`/`cancel` are called from the event loop; all engine calls happen
    in the engine thread."""

    def __init__(self, llm: LLM, engine_config: EngineConfig, max_waiting: int = 64, metrics: Metrics | None = None,
                 tracer: Any = None):
        self.llm = llm
        self.engine = Engine(llm.model, llm.eos_token_ids, engine_config)
        self.max_waiting = max_waiting
        self.metrics = metrics or Metrics()
        self.tracer = tracer
        self._cv = threading.Condition()
        self._adds: list[Request] = []
        self._cancels: list[Request] = []
        self._queued = 0  # requests submitted and not yet scheduled (nor ended)
        self._active: dict[int, tuple[Request, int]] = {}  # seq id -> (request, j)
        self._ids = itertools.count()
        self._stopping = False
        self._cancel_everything = False
        self._thread: threading.Thread | None = None
        self.metrics.kv_total.set(engine_config.num_blocks)
        self._update_gauges()

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gyrfalcon-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def capacity_tokens(self) -> int | None:
        return self.engine.capacity_tokens

    @property
    def num_queued(self) -> int:
        return self._queued

    # ---- event-loop side -------------------------------------------------------------------------------------

    def submit(self, route: str, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request; 429 (Overloaded) at once when --max-waiting requests are already waiting."""
        if not self.alive:
            raise APIError(503, "the server is shutting down", kind="unavailable")
        req = Request(route, list(prompt_ids), params, asyncio.get_running_loop())
        with self._cv:
            if self._queued >= self.max_waiting:
                raise Overloaded(self._queued)
            self._queued += 1
            self.metrics.queue_length.set(self._queued)
            req.seq_ids = [next(self._ids) for _ in range(req.n)]
            self._adds.append(req)
            self._cv.notify()
        return req

    def cancel_all(self) -> None:
        """Cancel every request in flight (a drain that ran out of time); callable from any thread. Streams end
        with an error event, other requests with a 503, and the server can then close its connections."""
        with self._cv:
            self._cancel_everything = True
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """End a request (client gone, shutdown): its sequences leave before the next step. Idempotent."""
        if req.done or req.cancelled:
            return
        req.cancelled = True
        with self._cv:
            self._cancels.append(req)
            self._cv.notify()

    async def stream(self, req: Request) -> AsyncIterator[list[Chunk]]:
        """The request's chunks step by step until every sequence has finished; raises on an engine error."""
        finished = 0
        while finished < req.n:
            item = await req.queue.get()
            if isinstance(item, BaseException):
                raise item
            finished += sum(c.finished for c in item)
            yield item

    async def collect(self, req: Request) -> list[list[Chunk]]:
        """Every chunk of every sequence, per sequence."""
        per_seq: list[list[Chunk]] = [[] for _ in range(req.n)]
        async for chunks in self.stream(req):
            for c in chunks:
                per_seq[c.seq].append(c)
        return per_seq

    # ---- engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._adds or self._cancels or self._stopping or self._cancel_everything
                               or self.engine.has_unfinished()):
                        self._cv.wait()
                    adds, self._adds = self._adds, []
                    cancels, self._cancels = self._cancels, []
                    stopping, everything = self._stopping, self._cancel_everything
                    self._cancel_everything = False
                for req in cancels:
                    self._cancel_now(req)
                for req in adds:
                    try:
                        self._add_now(req)
                    except Exception as exc:  # a request the engine refuses fails alone
                        log.exception("could not add request %s", req.id)
                        self._fail(req, f"the request could not be started: {exc}")
                if stopping or everything:
                    self._abort_all("cancelled", "the server is shutting down: the request was cancelled")
                if stopping:
                    return
                if self.engine.has_unfinished():
                    self._step()
                    if not self.engine.has_unfinished():
                        trim_heap()  # the batch just emptied: a moment when nothing waits on this thread
                self._update_gauges()
        except BaseException as exc:  # never die silently: /health turns 503 and waiting clients get an error
            log.exception("engine thread failed")
            self._abort_all("error", f"engine failure: {exc}")
            raise

    def _add_now(self, req: Request) -> None:
        if req.cancelled:
            self._end(req, "cancelled")
            return
        p = req.params
        for j, sid in enumerate(req.seq_ids):
            seed = None if p.seed is None else p.seed + j
            state = self.engine.add(sid, req.prompt_ids, p, seed, same_prompt_as=req.seq_ids[0] if j else None)
            self._active[sid] = (req, j)
            req.seeds.append(state.seed)
            req.texts.append(TextState(StreamDecoder(self.llm.tokenizer, req.prompt_ids), p.stop))
            req.generated.append(0)
            req.finish_reasons.append(None)
            req.t_last.append(0.0)
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))

    def _cancel_now(self, req: Request) -> None:
        if req.done:
            return
        for sid in req.seq_ids:
            self.engine.finish(sid, "cancelled")
            self._active.pop(sid, None)
        self.engine.has_unfinished()  # applies the finishes now: the blocks are free before the next step
        req.loop.call_soon_threadsafe(req.queue.put_nowait, RequestCancelled("the request was cancelled"))
        self._end(req, "cancelled")

    def _step(self) -> None:
        preempted_before = self.engine.scheduler.num_preemptions
        try:
            events = self.engine.step()
        except Exception as exc:  # e.g. out of device memory: fail the running requests, keep serving
            log.exception("engine step failed")
            self._abort_all("error", f"generation failed: {exc}")
            return
        now_ns = time.time_ns()
        self.metrics.steps.inc()
        self.metrics.preemptions.inc(self.engine.scheduler.num_preemptions - preempted_before)
        for seq, _ in self.engine.last_output.scheduled:
            entry = self._active.get(seq.seq_id)
            if entry is not None and entry[0].ns_scheduled is None:
                entry[0].ns_scheduled = now_ns
                with self._cv:
                    self._queued -= 1
        self._dispatch(events)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        out: dict[int, tuple[Request, list[Chunk]]] = {}
        for ev in events:
            entry = self._active.get(ev.index)
            if entry is None:
                continue
            req, j = entry
            # The rules of LLM.generate (text_stream): EOS is not text; a stop string ends the sequence before the
            # next step, and the text is cut where the stop string begins.
            text, finished, reason = req.texts[j].on_token(ev.token_id, ev.finished, ev.finish_reason)
            if finished and not ev.finished:
                self.engine.finish(ev.index, "stop")
            ev.finished, ev.finish_reason = finished, reason
            req.generated[j] += 1
            self.metrics.generated_tokens.inc()
            if req.t_first is None:
                req.t_first, req.ns_first = now, time.time_ns()
                self.metrics.ttft.observe(now - req.t_arrival)
            elif req.t_last[j]:
                self.metrics.itl.observe(now - req.t_last[j])
            req.t_last[j] = now
            if ev.finished:
                req.finish_reasons[j] = ev.finish_reason
                self._active.pop(ev.index, None)
            out.setdefault(id(req), (req, []))[1].append(Chunk(j, ev.token_id, text, ev.finished, ev.finish_reason,
                                                                  ev.logprob, ev.top_logprobs))
        for req, chunks in out.values():
            req.loop.call_soon_threadsafe(req.queue.put_nowait, chunks)
            if all(r is not None for r in req.finish_reasons):
                self._end(req, "ok")

    def _end(self, req: Request, outcome: str, error: str | None = None) -> None:
        if req.done:
            return
        req.done = True
        if req.ns_scheduled is None:
            with self._cv:
                self._queued -= 1
        end = time.perf_counter()
        self.metrics.count(req.route, outcome)
        self.metrics.duration.observe(end - req.t_arrival)
        tokens = sum(req.generated)
        if req.t_first is not None and tokens > req.n and end > req.t_first:
            self.metrics.tokens_per_second.observe((tokens - req.n) / (end - req.t_first))
        if self.tracer is not None:
            self._trace(req, outcome, error)

    def _trace(self, req: Request, outcome: str, error: str | None) -> None:
        from .tracing import emit_request_spans

        times = {"arrival": req.ns_arrival, "scheduled": req.ns_scheduled, "first_token": req.ns_first,
                 "end": time.time_ns()}
        attrs = {"gyrfalcon.route": req.route, "gyrfalcon.request_id": req.id, "gyrfalcon.outcome": outcome,
                 "gen_ai.usage.input_tokens": len(req.prompt_ids),
                 "gen_ai.usage.output_tokens": sum(req.generated), "gen_ai.request.n": req.n,
                 "gen_ai.request.max_tokens": req.params.max_new_tokens}
        try:
            emit_request_spans(self.tracer, "request", times, attrs, error)
        except Exception:  # tracing must never take the engine down
            log.exception("could not emit spans")

    def _fail(self, req: Request, error: str) -> None:
        for sid in req.seq_ids:
            self.engine.finish(sid, "error")
            self._active.pop(sid, None)
        self.engine.has_unfinished()
        req.error = error
        req.loop.call_soon_threadsafe(req.queue.put_nowait, RuntimeError(error))
        self._end(req, "error", error)

    def _abort_all(self, outcome: str, error: str | None) -> None:
        """End every request in flight (shutdown or engine failure); their clients get an error or an end."""
        reqs = {id(r): r for r, _ in self._active.values()}
        with self._cv:
            for r in self._adds:
                reqs[id(r)] = r
            self._adds = []
        for req in reqs.values():
            for sid in req.seq_ids:
                self.engine.finish(sid, outcome)
                self._active.pop(sid, None)
            if not req.done:
                msg = error or "the request was cancelled"
                exc = RequestCancelled(msg) if outcome == "cancelled" else RuntimeError(msg)
                req.loop.call_soon_threadsafe(req.queue.put_nowait, exc)
                req.error = error
                self._end(req, outcome, error)
        try:
            self.engine.has_unfinished()
        except Exception:
            pass
        self._update_gauges()

    def _update_gauges(self) -> None:
        m, e = self.metrics, self.engine
        m.queue_length.set(self._queued)
        m.running.set(e.num_running)
        m.kv_used.set(e.blocks_used)
        m.kv_free.set(e.blocks_free)
