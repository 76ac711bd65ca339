"""Where a key-owned webhook may POST: public addresses only, unless the operator allows more.

Without this, any API key could make the service reach its own loopback, the cloud metadata
address or the private network behind it, and read the answers back through the ping and the
delivery log. The rule is checked twice: when a key registers (or changes) a URL, and again on
every connection, inside the resolver the HTTP client connects with (`GuardedResolver`). The
address that passed the check is the one connected to, so a name that resolves to a public
address at registration and to 127.0.0.1 later (DNS rebinding) is still refused. Operator
endpoints from the config are trusted and may reach anything.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from yarl import URL

__all__ = ["GuardedResolver", "TargetBlocked", "TargetPolicy"]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
RESOLVE_TIMEOUT_S = 5.0


class TargetBlocked(OSError):
    """The URL's host is, or resolves to, an address key-owned endpoints may not reach."""


def _embedded_v4(ip: IpAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries through a tunnel (6to4, Teredo client), if any:
    `2002:7f00:1::` names loopback as surely as `127.0.0.1`."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def _kind(ip: IpAddress) -> str | None:
    """Why `ip` is not a public unicast address (None when it is)."""
    for attr, word in (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
                       ("is_link_local", "link-local"), ("is_multicast", "multicast"),
                       ("is_private", "private"), ("is_reserved", "reserved")):
        if getattr(ip, attr):
            return word
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if not ip.is_global:
        return "non-public"  # e.g. 100.64.0.0/10, carrier-grade NAT
    return None


@dataclass(frozen=True)
class TargetPolicy:
    """`allow_private`: anything goes (webhooks.allow_private_targets); `allowed`: networks that
    may be reached although not public (webhooks.allowed_target_networks)."""

    allow_private: bool = False
    allowed: tuple[IpNetwork, ...] = ()

    @classmethod
    def from_config(cls, allow_private: bool, networks: Iterable[str]) -> TargetPolicy:
        return cls(allow_private, tuple(ipaddress.ip_network(n, strict=False) for n in networks))

    def refusal(self, address: str) -> str | None:
        """None when `address` may be reached, else why not (for logs and the registering key)."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        except ValueError:
            return f"{address!r} is not an IP address"
        if self.allow_private:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:a.b.c.d is a.b.c.d on the wire
        elif ip in _NAT64:  # DNS64 hands these out for every IPv4 host: judge the host
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        candidates = [ip] + [v4 for v4 in [_embedded_v4(ip)] if v4 is not None]  # 6to4, Teredo: both
        for cand in candidates:
            if any(cand in net for net in self.allowed if cand.version == net.version):
                continue
            kind = _kind(cand)
            if kind is not None:
                return f"{ip} is a {kind} address" + (f" ({cand} inside)" if cand != ip else "")
        return None

    def check(self, addresses: Iterable[str]) -> None:
        """Raise `TargetBlocked` if any of `addresses` may not be reached: a name that resolves
        to one public and one private address is refused, not half-trusted."""
        for a in addresses:
            why = self.refusal(a)
            if why is not None:
                raise TargetBlocked(why)

    async def check_url(self, url: str) -> None:
        """At registration: the URL's host, resolved now, must pass. `TargetBlocked` says why."""
        host = URL(url).raw_host or ""  # parsed as the delivering client parses it
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            self.check([host])
            return
        except ValueError:
            pass
        if self.allow_private:
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else "timed out"
            raise TargetBlocked(f"host {host!r} does not resolve ({why})") from None
        self.check(str(info[4][0]) for info in infos)


class GuardedResolver(AbstractResolver):
    """The resolver of the HTTP client that delivers to key-owned endpoints: every lookup is
    checked against the policy before aiohttp connects to what it returned. aiohttp does not
    consult a resolver for IP literals, so the dispatcher checks those itself (`policy.check`)."""

    def __init__(self, policy: TargetPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[dict[str, Any]]:
        hosts = await self.inner.resolve(host, port, family)
        self.policy.check(h["host"] for h in hosts)
        return hosts

    async def close(self) -> None:
        await self.inner.close()
