"""Python client for a callbridge server: streaming sessions, WebRTC calls, the jobs and webhooks REST APIs.

`WebRtcClient` is loaded on first use (PEP 562): importing `bridge.client.webrtc` here would load
aiortc for every `callbridge stream`/`jobs` command, and would make
`python -m bridge.client.webrtc` warn on every run (runpy finds the module already imported by
its package before running it as __main__).
"""

from importlib import import_module
from typing import Any

from .errors import ApiError
from .rest import JobsClient, WebhooksClient
from .stream import StreamClient, StreamError

__all__ = ["ApiError", "JobsClient", "StreamClient", "StreamError", "WebRtcClient", "WebRtcError", "WebhooksClient"]

_LAZY = {"WebRtcClient": ".webrtc", "WebRtcError": ".webrtc"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
