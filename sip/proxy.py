"""What the dispatcher does with each transaction: a forwarding proxy with no Record-Route.

Only initial INVITEs and their CANCEL/ACK really need it; in-dialog requests go from the caller
straight to the worker's Contact, and the few that arrive here anyway are routed by Call-ID.

Failover (to the least-loaded other worker with room, never one already tried) happens on
408/486/500/503 or no answer at all, but only before the worker sent an 18x: the worker rings
(180) as soon as it takes a call, so a failure after that is the call's own outcome (in bridge
mode, the target's status) and is passed on instead of dialling the target again elsewhere.
A worker that answers 2xx after we gave up on it is ACKed and hung up (it would hold a slot for
a call nobody is on); one whose non-2xx we do not relay is ACKed (RFC 3261 17.1.1.3).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from sip.message import SipMessage, SipParseError, Via, make_response, name_addr_uri, new_branch
from sip.routing import Worker, WorkerPool
from sip.transactions import (
    LINGER_S,
    PENDING_TTL_S,
    ClientTransaction,
    InviteTransaction,
    TransactionTable,
    invite_key,
)
from sip.transport import Origin, SipTransport

__all__ = ["FAILOVER_CODES", "Proxy"]

FAILOVER_CODES = frozenset({408, 486, 500, 503})


def _uri_hostport(uri: str) -> tuple[str, int | None]:
    """Host and port of a sip: URI ("sip:u@h:5060;lr" -> ("h", 5060))."""
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    rest = rest.split("@", 1)[-1]
    for sep in (";", "?", ">"):
        rest = rest.split(sep, 1)[0]
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port = rest.partition(":")
    return host.lower(), int(port) if port.isdigit() else None


class Proxy:
    """Forwards requests to workers and responses back, over `transport`, keeping its state in
    `table` and choosing workers from `pool`. `t1` is the first retransmission interval towards
    a worker, `worker_timeout` how long a worker may stay silent before it counts as a 408."""

    def __init__(self, transport: SipTransport, table: TransactionTable, pool: WorkerPool, *,
                 counts: Counter[str], log: Any, warn: Callable[..., None], t1: float, worker_timeout: float,
                 dialog_ttl: float, retry_after_full: int) -> None:
        self.transport = transport
        self.table = table
        self.pool = pool
        self.counts = counts
        self.log = log
        self.warn = warn
        self.t1 = t1
        self.worker_timeout = worker_timeout
        self.dialog_ttl = dialog_ttl
        self.retry_after_full = retry_after_full
        self.own_hosts: set[str] = set()  # names of this host: a top Route naming one is ours
        self.rejected: Counter[int] = Counter()

    # ------------------------------------------------------------------ answering here
    def reply(self, req: SipMessage, origin: Origin, via: Via, status: int, reason: str | None = None,
              headers: Sequence[tuple[str, str]] = ()) -> bytes:
        """Answer a request here; `req`'s top Via already carries received/rport."""
        data = make_response(req, status, reason, headers=headers).to_bytes()
        self.transport.send_response(origin, data, via)
        if status >= 300:
            self.rejected[status] += 1
        return data

    def final_local(self, inv: InviteTransaction, status: int, reason: str | None = None,
                    headers: list[tuple[str, str]] | None = None) -> None:
        """Answer the caller's INVITE here with a final response (and remember it for
        retransmissions; its ACK stops here)."""
        self.table.settle(inv)
        via = inv.request.top_via
        assert via is not None
        data = self.reply(inv.request, inv.origin, via, status, reason, headers or [])
        inv.final, inv.local, inv.last_response, inv.last_via = status, True, data, via
        inv.expires = time.monotonic() + LINGER_S
        self.table.expire_dialog(inv.request.call_id, LINGER_S, only_worker=None)

    # ------------------------------------------------------------------ initial INVITE
    def strip_own_route(self, msg: SipMessage) -> None:
        """Drop a top Route naming us (a caller using us as its outbound proxy, RFC 3261 16.4)."""
        try:
            routes = msg.get_list("Route")
            if not routes:
                return
            host, port = _uri_hostport(name_addr_uri(routes[0]))
        except SipParseError:
            return
        if host in self.own_hosts and (port or 5060) == self.transport.port:
            msg.set_list("Route", routes[1:])

    def forward_invite(self, inv: InviteTransaction, worker: Worker) -> None:
        fwd = inv.request.copy()
        self.strip_own_route(fwd)
        mf = inv.request.max_forwards
        fwd.set("Max-Forwards", str((70 if mf is None else mf) - 1))
        branch = new_branch("cb")
        fwd.push_via(self.transport.via(branch))
        data = fwd.to_bytes()
        now = time.monotonic()
        c = ClientTransaction(branch, "INVITE", data, fwd, worker, inv.origin, inv, now + PENDING_TTL_S,
                              deadline=now + self.worker_timeout)
        self.table.put(self.table.clients, (branch, "INVITE"), c)
        inv.current = c
        inv.tried.append(worker.id)
        self.table.count(inv, worker)
        self.table.put(self.table.dialogs, inv.request.call_id or "", (worker.id, now + PENDING_TTL_S))
        self.counts["forwarded"] += 1
        self.log.info("sip_invite_forwarded", call_id=inv.request.call_id, worker=worker.id,
                      slots=inv.needed, load=f"{worker.load}/{worker.capacity}", attempt=len(inv.tried))
        self.transport.send_udp(data, worker.addr)
        self.table.arm(c, self.t1, self._resend, self._on_worker_timeout)

    def _resend(self, c: ClientTransaction) -> None:
        self.transport.send_udp(c.data, c.worker.addr)

    def _on_worker_timeout(self, c: ClientTransaction) -> None:
        inv = c.invite
        self.counts["worker_timeouts"] += 1
        self.warn("sip_worker_no_answer", worker=c.worker.id, call_id=c.request.call_id,
                  after_s=self.worker_timeout)
        self.table.abandon(c)
        if inv is None or inv.current is not c or inv.final is not None:
            return
        self.table.release(inv)
        if inv.cancelled:
            self.final_local(inv, 487)
        else:
            self.next_or_fail(inv, 408, "no answer")

    def next_or_fail(self, inv: InviteTransaction, status: int, why: str) -> None:
        """Fail over to another worker that can take the call, else answer `status` here."""
        nxt = self.pool.pick(inv.needed, inv.tried)
        if nxt is not None and not inv.cancelled:
            self.counts["failovers"] += 1
            self.log.warning("sip_failover", call_id=inv.request.call_id, from_worker=inv.tried[-1],
                             to_worker=nxt.id, why=why)
            self.forward_invite(inv, nxt)
            return
        self.final_local(inv, 487 if inv.cancelled else status,
                         headers=[("Retry-After", str(self.retry_after_full))] if status == 503 else [])

    def worker_gone(self, w: Worker) -> None:
        """INVITEs `w` never answered fail over to another worker at once; ones it was ringing
        are answered 500 (the call died with it)."""
        for inv in list(self.table.invites.values()):
            c = inv.current
            if c is None or c.worker is not w or c.abandoned or inv.final is not None:
                continue
            self.table.abandon(c)
            self.table.release(inv)
            if not c.provisional:
                self.next_or_fail(inv, 503, "worker exited")
            else:
                self.final_local(inv, 500, "Worker Exited")

    # ------------------------------------------------------------------ CANCEL / ACK
    def on_cancel(self, msg: SipMessage, origin: Origin, via: Via) -> None:
        inv = self.table.invites.get(invite_key(msg, via))
        if inv is None:
            self.reply(msg, origin, via, 481)
            return
        self.reply(msg, origin, via, 200)  # hop by hop: the CANCEL transaction ends here
        if inv.final is not None:
            return  # too late: the INVITE has its final response
        inv.cancelled = True
        c = inv.current
        if c is None or c.abandoned:
            return
        cancel = SipMessage(method="CANCEL", uri=c.request.uri)
        cancel.headers.append(("Via", self.transport.via(c.branch)))
        cancel.headers.append(("Max-Forwards", "70"))
        for r in c.request.get_all("Route"):
            cancel.headers.append(("Route", r))
        for name in ("From", "To", "Call-ID"):
            cancel.headers.append((name, c.request.get(name) or ""))
        cseq = c.request.cseq
        cancel.headers.append(("CSeq", f"{cseq[0] if cseq else 1} CANCEL"))
        if msg.get("Reason"):
            cancel.headers.append(("Reason", msg.get("Reason") or ""))
        data = cancel.to_bytes()
        cc = ClientTransaction(c.branch, "CANCEL", data, cancel, c.worker, None, None,
                               time.monotonic() + LINGER_S, local=True)
        self.table.put(self.table.clients, (c.branch, "CANCEL"), cc)
        self.log.info("sip_cancel_forwarded", call_id=msg.call_id, worker=c.worker.id)
        self.transport.send_udp(data, c.worker.addr)

    def on_ack(self, msg: SipMessage, origin: Origin, via: Via) -> None:
        inv = self.table.invites.get(invite_key(msg, via))
        if inv is not None and (inv.final is None or inv.final >= 300):
            c = inv.current
            if inv.local or c is None or inv.final is None:
                return  # ACK of our own final response (or a confused peer): it ends here
            self._forward_stateless(msg, c.worker, c.branch)  # same branch: matches the worker's INVITE transaction
            return
        key = (msg.call_id or "", via.branch or "", "INVITE")
        ck = self.table.retrans.get(key)  # ACK of a non-2xx answer to a re-INVITE forwarded by us
        c = self.table.clients.get(ck) if ck else None
        if c is not None and c.final is not None and c.final >= 300:
            self._forward_stateless(msg, c.worker, c.branch)
            return
        w = self._dialog_worker(msg.call_id)
        if w is not None:  # ACK of a 2xx, from a UA that sends it here instead of to the Contact
            self._forward_stateless(msg, w, new_branch("cb"))
            self.counts["forwarded_in_dialog"] += 1
        # else: nothing to do; an ACK is never answered

    def _forward_stateless(self, msg: SipMessage, worker: Worker, branch: str) -> None:
        fwd = msg.copy()
        mf = msg.max_forwards
        if mf is not None and mf <= 0:
            return
        fwd.set("Max-Forwards", str((70 if mf is None else mf) - 1))
        self.strip_own_route(fwd)
        fwd.push_via(self.transport.via(branch))
        self.transport.send_udp(fwd.to_bytes(), worker.addr)

    # ------------------------------------------------------------------ in-dialog requests
    def _dialog_worker(self, call_id: str | None) -> Worker | None:
        wid = self.table.dialog_worker_id(call_id)
        w = self.pool.get(wid) if wid is not None else None
        return w if w is not None and w.alive else None

    def on_in_dialog(self, msg: SipMessage, origin: Origin, via: Via) -> None:
        """BYE, re-INVITE, INFO... that reached the dispatcher: send them to the worker that has
        the call (by Call-ID), statefully enough to route the response back."""
        method = msg.method or ""
        call_id = msg.call_id or ""
        rkey = (call_id, via.branch or f"2543:{msg.cseq}", method)
        ck = self.table.retrans.get(rkey)
        old = self.table.clients.get(ck) if ck else None
        if old is not None:  # retransmission: the worker's transaction answers it again
            self.transport.send_udp(old.data, old.worker.addr)
            return
        w = self._dialog_worker(call_id)
        if w is None:
            self.reply(msg, origin, via, 481)
            return
        if msg.max_forwards == 0:
            self.reply(msg, origin, via, 483)
            return
        fwd = msg.copy()
        mf = msg.max_forwards
        fwd.set("Max-Forwards", str((70 if mf is None else mf) - 1))
        self.strip_own_route(fwd)
        branch = new_branch("cb")
        fwd.push_via(self.transport.via(branch))
        data = fwd.to_bytes()
        ttl = PENDING_TTL_S if method == "INVITE" else LINGER_S
        c = ClientTransaction(branch, method, data, fwd, w, origin, None, time.monotonic() + ttl, index_key=rkey)
        self.table.put(self.table.clients, (branch, method), c)
        self.table.put(self.table.retrans, rkey, (branch, method))
        self.counts["forwarded_in_dialog"] += 1
        self.log.info("sip_in_dialog_forwarded", method=method, call_id=call_id, worker=w.id)
        self.transport.send_udp(data, w.addr)

    # ------------------------------------------------------------------ responses from workers
    def on_response(self, msg: SipMessage) -> None:
        try:
            via = msg.top_via
            cseq = msg.cseq
        except SipParseError as e:
            self.counts["parse_errors"] += 1
            self.warn("sip_bad_response", error=str(e))
            return
        c = self.table.clients.get((via.branch or "", cseq[1])) if via is not None and cseq is not None else None
        if c is None:
            self.counts["stray_responses"] += 1
            self.log.debug("sip_stray_response", status=msg.status, call_id=msg.call_id)
            return
        status = msg.status or 0
        c.responded = True
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        if c.local:
            return  # answer to our own CANCEL / BYE
        if c.method == "INVITE" and c.invite is not None:
            self._on_invite_response(c, msg, status)
            return
        if status == 100:
            return  # hop by hop (RFC 3261 16.7): never relayed
        if status >= 200:
            first = c.final is None
            c.final = status
            c.expires = time.monotonic() + LINGER_S
            if first and c.method == "BYE" and status < 300:
                self.table.expire_dialog(msg.call_id, LINGER_S, only_worker=c.worker.id)
        self._relay(c, msg)

    def _on_invite_response(self, c: ClientTransaction, msg: SipMessage, status: int) -> None:
        inv = c.invite
        assert inv is not None
        now = time.monotonic()
        if c.abandoned or inv.current is not c:
            if status >= 300:
                self._ack_worker(c, msg)
            elif status >= 200:
                self._hang_up_stray(c, msg)
            return
        if status == 100:
            return  # we said Trying ourselves
        if status < 200:
            c.provisional = True
            data = self._relay(c, msg)
            if data is not None:
                inv.last_response = data
            return
        first = c.final is None
        if status < 300:
            c.final = status
            if inv.final is None:
                inv.final = status
            c.expires = inv.expires = now + LINGER_S
            if first:
                self.table.put(self.table.dialogs, inv.request.call_id or "", (c.worker.id, now + self.dialog_ttl))
                self.log.info("sip_call_answered", call_id=inv.request.call_id, worker=c.worker.id)
            self._relay(c, msg)  # every 2xx retransmission too: the caller's ACK goes to the Contact
            return
        if first:
            c.final = status
            c.expires = now + LINGER_S
            self.table.release(inv)
            # Only a worker that refused the call outright is skipped: after its 18x the worker had
            # taken the call, and a failure is the call's own (a bridge target busy or unreachable,
            # relayed with the target's status); failing over would dial the target again.
            if status in FAILOVER_CODES and not c.provisional and not inv.cancelled and inv.final is None:
                nxt = self.pool.pick(inv.needed, inv.tried)
                if nxt is not None:
                    self._ack_worker(c, msg)
                    self.table.abandon(c)
                    self.counts["failovers"] += 1
                    self.log.warning("sip_failover", call_id=inv.request.call_id, from_worker=c.worker.id,
                                     to_worker=nxt.id, why=f"{status} {msg.reason}")
                    self.forward_invite(inv, nxt)
                    return
            inv.final = status
            inv.expires = now + LINGER_S
            self.table.settle(inv)
            self.table.expire_dialog(inv.request.call_id, LINGER_S, only_worker=c.worker.id)
            self.log.info("sip_invite_failed", call_id=inv.request.call_id, worker=c.worker.id, status=status)
        data = self._relay(c, msg)  # the caller's ACK is forwarded to the worker with our branch
        if data is not None:
            inv.last_response = data

    def _relay(self, c: ClientTransaction, msg: SipMessage) -> bytes | None:
        """Pass a worker's response on: our Via off, to the next Via, the way the request came."""
        if c.origin is None:
            return None
        resp = msg.copy()
        resp.pop_via()
        try:
            nxt = resp.top_via
        except SipParseError as e:
            self.warn("sip_bad_response", error=f"next Via: {e}")
            return None
        if nxt is None:
            self.warn("sip_bad_response", error="response has no Via after ours")
            return None
        data = resp.to_bytes()
        self.transport.send_response(c.origin, data, nxt)
        self.counts["relayed"] += 1
        return data

    def _ack_worker(self, c: ClientTransaction, resp: SipMessage) -> None:
        """ACK a non-2xx final response we do not relay (RFC 3261 17.1.1.3): same branch as the
        INVITE, To from the response, so the worker stops retransmitting it."""
        ack = SipMessage(method="ACK", uri=c.request.uri)
        ack.headers.append(("Via", self.transport.via(c.branch)))
        ack.headers.append(("Max-Forwards", "70"))
        for r in c.request.get_all("Route"):
            ack.headers.append(("Route", r))
        ack.headers.append(("From", c.request.get("From") or ""))
        ack.headers.append(("To", resp.get("To") or c.request.get("To") or ""))
        ack.headers.append(("Call-ID", c.request.get("Call-ID") or ""))
        cseq = c.request.cseq
        ack.headers.append(("CSeq", f"{cseq[0] if cseq else 1} ACK"))
        self.transport.send_udp(ack.to_bytes(), c.worker.addr)

    def _hang_up_stray(self, c: ClientTransaction, resp: SipMessage) -> None:
        """A worker answered 2xx after we gave up on it (failover, timeout): ACK and BYE it, or
        it would hold a call slot for a call nobody is on."""
        try:
            contact = name_addr_uri(resp.get("Contact") or "") or c.request.uri or ""
        except SipParseError:
            contact = c.request.uri or ""
        cseq = c.request.cseq
        num = cseq[0] if cseq else 1
        for method, n in (("ACK", num), ("BYE", num + 1)):
            req = SipMessage(method=method, uri=contact)
            branch = new_branch("cb")
            req.headers += [("Via", self.transport.via(branch)), ("Max-Forwards", "70"),
                            ("From", c.request.get("From") or ""), ("To", resp.get("To") or ""),
                            ("Call-ID", c.request.get("Call-ID") or ""), ("CSeq", f"{n} {method}")]
            data = req.to_bytes()
            if method == "BYE":
                self.table.put(self.table.clients, (branch, "BYE"),
                               ClientTransaction(branch, "BYE", data, req, c.worker, None, None,
                                                 time.monotonic() + LINGER_S, local=True))
            self.transport.send_udp(data, c.worker.addr)
        self.warn("sip_stray_answer_hung_up", worker=c.worker.id, call_id=c.request.call_id)
