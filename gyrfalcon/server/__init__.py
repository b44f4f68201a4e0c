"""`gyrfalcon serve`: the TGI and OpenAI HTTP APIs over the continuous-batching engine.

    protocol.py  request schemas, validation, error shapes      serving.py  the engine thread <-> asyncio
    app.py       routes, SSE, auth, the chat page                metrics.py  Prometheus   tracing.py  OpenTelemetry
    cli.py       the `serve` subcommand

`create_app(llm, ServerConfig(...))` builds the app for any ASGI server; `gyrfalcon serve` runs it with uvicorn.
"""

from __future__ import annotations

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'gyrfalcon.server' has no attribute {name!r}")
