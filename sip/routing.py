"""Where a call goes: its bridge target (and so the call slots it takes), and the worker that
answers it.

`Router.bridge_target` is the one bridging decision. The dispatcher calls it to count a call's
slots (`call_slots`: a bridged call needs two of a worker's call slots) and the worker calls it
to place the outbound leg, both on the same INVITE parsed by sip/message.py, so they cannot
disagree about a call (they did when the worker had its own request-URI regex: no tel:, no
percent-decoding). Routes come from config `sip.routes` as "USER=SIP_URI" entries matched
against the request-URI user (`uri_user`: sip:/sips: user or tel: number, percent-decoded);
"*" matches any user. A header (config `sip.target_header`) may name the target instead, but
only where `sip.allow_target_header` is set: otherwise any caller could make the service dial
anywhere (toll fraud), so the header is ignored by default.

`WorkerPool` is the dispatcher's load policy, the call-load algorithm of Kamailio's dispatcher
module: a new call goes to the least-loaded live worker with the free slots it needs, never one
already tried for it. A worker's load is what its last `load` report said plus `pending`, the
slots of INVITEs sent to it that no report reflects yet, so a burst of calls cannot overfill a
worker between reports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sip.message import SipMessage

__all__ = ["BRIDGED_SLOTS", "CALL_SLOTS", "Router", "RouteError", "Worker", "WorkerPool", "call_slots",
           "parse_routes"]

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


@dataclass
class Worker:
    """One pjsua2 worker: where it listens, how many call slots it has and uses (from its `load`
    reports), and `pending`, the slots of INVITEs sent to it that no report reflects yet."""

    id: int
    host: str
    port: int
    capacity: int
    used: int = 0
    alive: bool = False
    pending: int = 0

    @property
    def load(self) -> int:
        return self.used + self.pending

    @property
    def free(self) -> int:
        return self.capacity - self.load

    @property
    def addr(self) -> tuple[str, int]:
        return self.host, self.port


class WorkerPool:
    """The workers a dispatcher spreads calls over, and which one takes the next call."""

    def __init__(self, workers: Sequence[Worker]) -> None:
        ids = [w.id for w in workers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids must be unique, got {ids}")
        self.workers = list(workers)
        self._by_id = {w.id: w for w in self.workers}

    def get(self, worker_id: int) -> Worker | None:
        return self._by_id.get(worker_id)

    def pick(self, needed: int, exclude: Sequence[int] = ()) -> Worker | None:
        """The least-loaded live worker with `needed` free slots (call-load balancing)."""
        ok = [w for w in self.workers if w.alive and w.id not in exclude and w.free >= needed]
        return min(ok, key=lambda w: (w.load / max(w.capacity, 1), w.load, w.id)) if ok else None

    def full_reason(self, needed: int) -> str:
        """Why `pick(needed)` found no worker (the Warning of the 503)."""
        alive = [w for w in self.workers if w.alive]
        if not alive:
            return "no SIP worker is running"
        return (f"all call slots are in use ({sum(w.load for w in alive)}/{sum(w.capacity for w in alive)}, "
                f"this call needs {needed})")

    def stats(self) -> list[dict[str, Any]]:
        return [{"id": w.id, "alive": w.alive, "used": w.used, "pending": w.pending, "capacity": w.capacity}
                for w in self.workers]
