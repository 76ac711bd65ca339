"""Python client for a callbridge server: streaming sessions and the jobs REST API."""

from .errors import ApiError
from .rest import JobsClient
from .stream import StreamClient, StreamError
from .webrtc import WebRtcClient, WebRtcError

__all__ = ["ApiError", "JobsClient", "StreamClient", "StreamError", "WebRtcClient", "WebRtcError"]
