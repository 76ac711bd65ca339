"""Python client for a callbridge server: streaming sessions, WebRTC calls, the jobs and webhooks REST APIs.

`WebRtcClient` is loaded on first use (PEP 562): importing `bridge.client.webrtc` here would load
aiortc for every `callbridge stream`/`jobs` command. Its command line is `callbridge webrtc`
(bridge/commands/webrtc.py): the client package imports nothing of the commands.
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
