"""Bridge-mode routing: which target SIP URI, if any, an incoming call is forwarded to.

Shared by the dispatcher (a bridged call needs two of a worker's call slots) and the worker (it
places the outbound leg). Routes come from config `sip.routes` as "USER=SIP_URI" entries matched
against the request-URI user; "*" matches any user. A header (config `sip.target_header`) may
name the target instead, but only where `sip.allow_target_header` is set: otherwise any caller
could make the service dial anywhere (toll fraud), so the header is ignored by default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Router", "RouteError", "parse_routes"]

_SIP_URI = re.compile(r"^sips?:[^\s<>\"]+$", re.I)


class RouteError(ValueError):
    """A route entry or a header target that is not a usable SIP URI."""


def _check_uri(uri: str, where: str) -> str:
    uri = uri.strip()
    if uri.startswith("<") and uri.endswith(">"):
        uri = uri[1:-1].strip()
    if not _SIP_URI.match(uri):
        raise RouteError(f"{where}: {uri!r} is not a sip: or sips: URI")
    return uri


def parse_routes(entries: tuple[str, ...] | list[str]) -> dict[str, str]:
    routes: dict[str, str] = {}
    for e in entries:
        user, sep, uri = e.partition("=")
        if not sep or not user.strip():
            raise RouteError(f"sip.routes entry {e!r} must look like USER=sip:target@host")
        routes[user.strip()] = _check_uri(uri, f"sip.routes entry {e!r}")
    return routes


@dataclass(frozen=True)
class Router:
    routes: Mapping[str, str]
    target_header: str = "X-Callbridge-Target"
    allow_target_header: bool = False

    @classmethod
    def from_config(cls, sip_config) -> "Router":  # sip_config: bridge.config.SipConfig
        return cls(parse_routes(sip_config.routes), sip_config.target_header, sip_config.allow_target_header)

    def target_for(self, request_user: str, headers: Mapping[str, str]) -> str | None:
        """The bridge target for a call to `request_user` with these INVITE headers, or None
        (answer and transcribe the caller only). Header names are matched case-insensitively."""
        if self.allow_target_header and self.target_header:
            want = self.target_header.lower()
            for name, value in headers.items():
                if name.lower() == want and value.strip():
                    return _check_uri(value, f"header {self.target_header}")
        if request_user in self.routes:
            return self.routes[request_user]
        return self.routes.get("*")
