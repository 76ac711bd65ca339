"""Bridge-mode routing: which target SIP URI, if any, an incoming call is forwarded to.

`Router.bridge_target` is the one bridging decision. The dispatcher calls it to count a call's
slots (`call_slots`: a bridged call needs two of a worker's call slots) and the worker calls it
to place the outbound leg, both on the same INVITE parsed by sip/message.py, so they cannot
disagree about a call (they did when the worker had its own request-URI regex: no tel:, no
percent-decoding). Routes come from config `sip.routes` as "USER=SIP_URI" entries matched
against the request-URI user (`uri_user`: sip:/sips: user or tel: number, percent-decoded);
"*" matches any user. A header (config `sip.target_header`) may
name the target instead, but only where `sip.allow_target_header` is set: otherwise any caller
could make the service dial anywhere (toll fraud), so the header is ignored by default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sip.message import SipMessage

__all__ = ["BRIDGED_SLOTS", "CALL_SLOTS", "Router", "RouteError", "call_slots", "parse_routes"]

CALL_SLOTS = 1  # pjsua call slots a call answered here takes (the caller leg)
BRIDGED_SLOTS = 2  # the caller leg and the outbound leg to the bridge target

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

    def bridge_target(self, invite: SipMessage) -> str | None:
        """The bridge target of this initial INVITE, or None (answer and transcribe the caller
        only): the first non-empty target header where allowed, else the route of the request-URI
        user, else the "*" route. Raises RouteError for a target header that is not a SIP URI."""
        if self.allow_target_header and self.target_header:
            for value in invite.get_all(self.target_header):  # names match case-insensitively
                if value.strip():
                    return _check_uri(value, f"header {self.target_header}")
        user = invite.request_user
        if user in self.routes:
            return self.routes[user]
        return self.routes.get("*")


def call_slots(target: str | None) -> int:
    """Call slots a call with this bridge target (`Router.bridge_target`) takes on a worker."""
    return BRIDGED_SLOTS if target else CALL_SLOTS
