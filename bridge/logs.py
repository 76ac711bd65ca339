"""Logging: structlog for our code, with stdlib logging (libraries) rendered the same way.

`fmt="json"` writes one JSON object per line (timestamp in ISO UTC, level, event, logger and every
bound key) for log collectors; `fmt="console"` writes readable `key=value` lines for development.

Per-job context uses `structlog.contextvars`: inside `with bind_job(job_id):` every line, from
structlog or stdlib loggers, carries `job_id`, including lines from asyncio tasks created inside
the block (tasks copy the context when created), so one call's lines can be grepped out of a
busy service without passing the id through every function.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import IO, Any, Iterator

import structlog
from aiohttp.http_exceptions import HttpProcessingError

_HANDLER_FLAG = "_callbridge_handler"


def _shared_processors() -> list[Any]:
    """Run for both structlog and stdlib records, so the two look alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.StackInfoRenderer(),
    ]


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a header line over 8190 bytes, bytes that are not
    HTTP) at error level with a traceback. The fault is the client's, and anyone can send one:
    make it one info line naming the problem, so hostile traffic cannot fill the log with
    tracebacks (the client still gets aiohttp's 400)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = f"{record.getMessage()}: malformed request ({type(exc).__name__}, {getattr(exc, 'code', 400)})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def configure_logging(fmt: str = "console", level: str = "info", stream: IO[str] | None = None) -> None:
    """Route structlog and stdlib logging to one handler on `stream` (default stderr).

    Safe to call again (tests, or after the config is loaded): the previous handler is replaced.
    """
    fmt = fmt.lower()
    if fmt not in ("console", "json"):
        raise ValueError(f"log format must be console or json, got {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    stream = stream if stream is not None else sys.stderr

    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer()
        final = [structlog.processors.format_exc_info, structlog.processors.UnicodeDecoder(), renderer]
    else:
        colors = bool(getattr(stream, "isatty", lambda: False)())
        final = [structlog.dev.ConsoleRenderer(colors=colors)]

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_FLAG, True)

    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequestFilter) for f in server.filters):
        server.addFilter(_MalformedRequestFilter())

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_FLAG, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: reconfiguring (tests, config reload) must reach loggers already created.
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger backed by the stdlib logger `name` (levels and handlers shared)."""
    return structlog.stdlib.get_logger(name, **initial)


@contextlib.contextmanager
def bind_job(job_id: str, **kw: Any) -> Iterator[None]:
    """Put `job_id` (and `kw`) on every line logged in this context, restoring it on exit.

    Tasks started inside the block inherit the binding; code after the block does not.
    """
    with structlog.contextvars.bound_contextvars(job_id=job_id, **kw):
        yield
