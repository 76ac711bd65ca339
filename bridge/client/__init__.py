"""Python client for a callbridge server: streaming sessions, WebRTC calls, the jobs and webhooks REST APIs."""

from .errors import ApiError
from .rest import JobsClient, WebhooksClient
from .stream import StreamClient, StreamError
from .webrtc import WebRtcClient, WebRtcError

__all__ = ["ApiError", "JobsClient", "StreamClient", "StreamError", "WebRtcClient", "WebRtcError", "WebhooksClient"]
