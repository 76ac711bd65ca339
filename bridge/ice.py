"""ICE on one machine: let aioice offer the loopback address as a host candidate.

Shared by the WebRTC ingress (`webrtc.loopback_candidates`) and the WebRTC client (a server on a
loopback address), so it lives in neither: a leaf module importing only aioice.
"""

from __future__ import annotations

import functools

import aioice.ice

__all__ = ["allow_loopback_candidates"]


def allow_loopback_candidates() -> None:
    """Make aioice offer 127.0.0.1 as a host candidate, process-wide and idempotent.

    aioice drops 127.0.0.1 from the addresses it gathers and has no option to keep it, so two
    peers on one machine (a browser and the service, or this client and a local server) could not
    meet over loopback, and in a network namespace with only `lo` they would have no candidate at
    all. The only hook is the module function it calls, `aioice.ice.get_host_addresses`: wrap it."""
    orig = aioice.ice.get_host_addresses
    if getattr(orig, "_callbridge_loopback", False):
        return

    @functools.wraps(orig)
    def with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        addresses = list(orig(use_ipv4=use_ipv4, use_ipv6=use_ipv6))
        if use_ipv4 and "127.0.0.1" not in addresses:
            addresses.insert(0, "127.0.0.1")
        return addresses

    with_loopback._callbridge_loopback = True  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = with_loopback
