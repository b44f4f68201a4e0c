"""`gyrfalcon serve`: arguments and the run function (imports FastAPI/uvicorn only when it runs)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import threading
import time

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "mi": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
          "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4}


def parse_bytes(text: str) -> int:
    """'268435456', '256MiB', '2GB', '1.5GiB' -> bytes."""
    m = _SIZE.match(text)
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2GiB, 512MB, 1000000)")
    value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive")
    return value


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a fraction in (0, 1]")
    return v


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return v


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import _model_args

    _model_args(p, positional=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("GYRFALCON_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but /health (default: "
                        "$GYRFALCON_API_KEY; none)")
    p.add_argument("--served-model-name", help="the model id in /v1/models and responses (default: the model dir)")
    mem = p.add_argument_group("engine")
    mem.add_argument("--kv-cache-bytes", type=parse_bytes,
                     help="KV-cache (or Falcon-Mamba state) pool size, e.g. 2GiB (default: --kv-cache-fraction of "
                          "free memory)")
    mem.add_argument("--kv-cache-fraction", type=_fraction, default=None,
                     help="fraction of free memory for the pool when --kv-cache-bytes is not given (default: 0.5 "
                          "of free GPU memory; on CPU 0.1 of available RAM, at most 4 GiB)")
    mem.add_argument("--block-size", type=_positive, default=16, help="tokens per KV block (default: 16)")
    mem.add_argument("--max-batch-size", type=_positive, default=32,
                     help="most sequences in the running batch (default: 32)")
    mem.add_argument("--max-batch-tokens", type=_positive, default=None,
                     help="token budget of one step: decode tokens + prefill chunks; a long prompt is prefilled "
                          "in chunks of what the running streams leave (default: 256 on CPU, 2048 on GPU)")
    mem.add_argument("--max-waiting", type=_positive, default=64,
                     help="requests allowed to wait for the batch; beyond them 429 (default: 64)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds to let running requests finish before cancelling them (default: 30)")
    p.add_argument("--otlp-endpoint", help="export OpenTelemetry spans over OTLP/HTTP to this URL "
                                           "(e.g. http://127.0.0.1:4318)")
    p.add_argument("--threads", type=_positive, help="CPU threads for the model (default: torch's, all cores)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def default_kv_cache_bytes(device, fraction: float | None) -> int:
    import psutil
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * (fraction or 0.5))
    avail = psutil.virtual_memory().available
    if fraction is not None:
        return int(avail * fraction)
    return int(min(avail * 0.1, 4 * 1024**3))


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..cli import _load
    from ..memory import cap_onednn_primitive_cache
    from .app import ServerConfig, create_app, default_engine_config

    cap_onednn_primitive_cache()  # before any oneDNN call: a long-running process sees many prefill shapes
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = getattr(args, "model_pos", None) or args.model
    llm = _load(args)  # the same loading as `gyrfalcon generate`: --quantize, --skip, --dtype...
    kv_bytes = args.kv_cache_bytes or default_kv_cache_bytes(llm.device, args.kv_cache_fraction)
    budget = args.max_batch_tokens or (2048 if llm.device.type == "cuda" else 256)
    engine = default_engine_config(llm, kv_bytes, args.block_size, args.max_batch_size, budget)
    name = args.served_model_name or (str(model) if model else "tiny-falcon-shakespeare")
    config = ServerConfig(model_name=name, api_key=args.api_key, max_waiting=args.max_waiting, engine=engine,
                          otlp_endpoint=args.otlp_endpoint)
    app = create_app(llm, config)
    capacity = app.state.serving.capacity_tokens
    print(f"gyrfalcon serve: {name} on {llm.device} ({str(llm.dtype).split('.')[-1]}); pool of "
          f"{engine.num_blocks} blocks ({'state slots' if capacity is None else f'{capacity} tokens'}), "
          f"batch <= {engine.max_batch_size} sequences / {engine.max_batch_tokens} tokens a step", file=sys.stderr)

    # The drain: on SIGTERM uvicorn stops accepting and waits for the open requests; after --shutdown-timeout we
    # cancel what is still running ourselves, so that every stream ends with an event and every connection
    # closes cleanly. uvicorn's own graceful timeout (which cancels the handlers' tasks) is only the backstop.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.shutdown_timeout + 10, access_log=False,
                                           lifespan="on"))
    _cancel_after(server, app.state.serving, args.shutdown_timeout)
    # uvicorn re-raises the signal that stopped it once it is done; with this handler in place that is a no-op
    # and a SIGTERM-drained server exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    _announce_port(server, args.host)
    server.run()
    return 0 if server.started else 1


def _cancel_after(server, serving, timeout: float, cut_grace: float = 2.0) -> None:
    """On the first SIGTERM/SIGINT, cancel every request still running `timeout` seconds later; `cut_grace`
    seconds after that, drop the connections that are still open.

    A cancelled stream ends with an error event, but a client that stopped reading cannot receive it: the
    handler then waits in `send` on a full socket buffer until uvicorn's backstop cancels its task (a traceback,
    and the drain takes 10 s longer). Aborting the transport discards the unread bytes and wakes that `send`."""
    handle_exit = server.handle_exit
    timer: list[threading.Timer] = []

    def cancel_then_cut() -> None:
        serving.cancel_all()
        time.sleep(cut_grace)
        loop = getattr(server, "_gf_loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_abort_connections, server)

    def on_signal(sig, frame) -> None:
        if not timer:
            timer.append(threading.Timer(timeout, cancel_then_cut))
            timer[0].daemon = True
            timer[0].start()
        handle_exit(sig, frame)

    server.handle_exit = on_signal


def _abort_connections(server) -> None:
    for conn in list(server.server_state.connections):
        transport = getattr(conn, "transport", None)
        if transport is not None:  # (also one closing with unsent bytes: close() would wait for the reader)
            transport.abort()


def _announce_port(server, host: str) -> None:
    """Print the URL once the socket is bound (with --port 0 that is the only way to learn the port)."""
    startup = server.startup

    async def startup_and_announce(sockets=None):
        server._gf_loop = asyncio.get_running_loop()  # for the drain's connection cut (_cancel_after)
        await startup(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                port = sock.getsockname()[1]
                print(f"gyrfalcon serve: listening on http://{host}:{port}", file=sys.stderr, flush=True)
                return

    server.startup = startup_and_announce
