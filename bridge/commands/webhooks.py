"""`callbridge webhooks ...`: register webhook endpoints, read their delivery log, redeliver, test.

Like `jobs`, it talks to a running server over the REST API (docs/webhooks.md), so it sees the
endpoints of the key it uses and nothing else. Server, key and exit codes are those of `jobs`:
0 ok, 1 the operation failed (server error, unreachable, a test ping not delivered), 2 bad input
(bad option or field, unknown webhook, refused key); errors are one line on stderr.

`--url` names the server here as everywhere, so `update` takes the endpoint's new address as
`--endpoint-url`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from bridge.client.rest import WebhooksClient
from bridge.commands.jobs import _when
from bridge.commands.output import json_text, table
from bridge.commands.remote import PROG, _usage_error, remote_flags, run_remote
from bridge.webhooks.model import ALL_EVENT_TYPES, DEFAULT_EVENTS, SOURCES

__all__ = ["DISPATCH", "add_webhooks_parser", "format_webhook"]

SECRET_NOTE = f"store this secret now: it is not shown again (a new one: `{PROG} webhooks update ID --secret S`)"


def format_webhook(hook: dict[str, Any]) -> str:
    """The human view of one endpoint; the full secret only when the answer carries it."""
    head = f"{hook['id']}  {'enabled' if hook.get('enabled') else 'disabled'}"
    if hook.get("managed_by") == "config":
        head += "  (from the service config: change it there)"
    lines = [head,
             f"url          {hook['url']}",
             f"events       {', '.join(hook.get('events') or [])}",
             f"sources      {', '.join(hook.get('sources') or []) or 'all'}",
             f"description  {hook.get('description') or '-'}",
             f"secret       {hook.get('secret') or hook.get('secret_hint') or '-'}",
             f"created      {_when(hook.get('created_at'))}",
             f"updated      {_when(hook.get('updated_at'))}"]
    circuit = hook.get("circuit")
    if circuit:  # the endpoint's breaker (docs/webhooks.md, "Fairness")
        state = circuit["state"].replace("_", "-")
        if circuit["consecutive_failures"]:
            state += f" ({circuit['consecutive_failures']} failed attempts in a row"
            state += f"; next probe {_when(circuit['retry_at'])})" if circuit.get("retry_at") else ")"
        lines.append(f"circuit      {state}")
    if hook.get("secret"):
        lines.append(SECRET_NOTE)
    return "\n".join(lines) + "\n"


def _show(hook: dict[str, Any], as_json: bool) -> int:
    sys.stdout.write(json_text(hook) + "\n" if as_json else format_webhook(hook))
    return 0


# --------------------------------------------------------------------------- handlers


def cmd_webhooks_create(args: argparse.Namespace) -> int:
    async def work(c: WebhooksClient) -> int:
        hook = await c.create(args.endpoint_url, secret=args.secret, events=args.events, sources=args.sources,
                              description=args.description, enabled=False if args.disabled else None)
        return _show(hook, args.json)

    return run_remote(args, WebhooksClient, work)


def cmd_webhooks_list(args: argparse.Namespace) -> int:
    async def work(c: WebhooksClient) -> int:
        hooks = await c.list()
        if args.json:
            print(json_text({"webhooks": hooks}))
        elif not hooks:
            print("no webhooks")
        else:
            rows = [[h["id"], "on" if h.get("enabled") else "off", ",".join(h.get("events") or []),
                     ",".join(h.get("sources") or []) or "all", h["url"], h.get("description") or ""]
                    for h in hooks]
            print("\n".join(table(["ID", "STATE", "EVENTS", "SOURCES", "URL", "DESCRIPTION"], rows)))
        return 0

    return run_remote(args, WebhooksClient, work)


def cmd_webhooks_show(args: argparse.Namespace) -> int:
    async def work(c: WebhooksClient) -> int:
        return _show(await c.get(args.webhook_id), args.json)

    return run_remote(args, WebhooksClient, work)


def cmd_webhooks_update(args: argparse.Namespace) -> int:
    fields = {"url": args.endpoint_url, "secret": args.secret, "events": args.events, "sources": args.sources,
              "description": args.description, "enabled": args.enabled}
    if all(v is None for v in fields.values()):
        raise _usage_error("nothing to change: give --endpoint-url, --secret, --events, --sources, "
                           "--description, --enable or --disable")

    async def work(c: WebhooksClient) -> int:
        return _show(await c.update(args.webhook_id, **fields), args.json)

    return run_remote(args, WebhooksClient, work)


def cmd_webhooks_delete(args: argparse.Namespace) -> int:
    async def work(c: WebhooksClient) -> int:
        await c.delete(args.webhook_id)
        print(f"deleted {args.webhook_id}")
        return 0

    return run_remote(args, WebhooksClient, work)


def _last(d: dict[str, Any]) -> str:
    """What the last attempt got, on one short line."""
    if d.get("last_error"):
        text = " ".join(str(d["last_error"]).split())
        return text if len(text) <= 60 else text[:59] + "…"
    return f"HTTP {d['last_status']}" if d.get("last_status") else "-"


def cmd_webhooks_deliveries(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise _usage_error(f"--limit must be at least 1, got {args.limit}")

    async def work(c: WebhooksClient) -> int:
        rows: list[dict[str, Any]] = []
        cursor = args.cursor
        while len(rows) < args.limit:  # each page asks for what is still missing: never past the limit
            page = await c.deliveries(args.webhook_id, status=args.status, job_id=args.job,
                                      limit=min(500, args.limit - len(rows)), cursor=cursor)
            rows += page["deliveries"]
            cursor = page.get("next")
            if not cursor:
                break
        if args.json:
            print(json_text({"deliveries": rows, "next": cursor}))
            return 0
        if not rows:
            print("no deliveries")
        else:
            cells = [[str(d["id"]), d["status"], d["type"], d["job_id"], str(d["attempts"]),
                      _when(d.get("created_at")), _last(d)] for d in rows]
            print("\n".join(table(["ID", "STATUS", "TYPE", "JOB", "ATTEMPTS", "CREATED", "LAST"], cells)))
        if cursor:
            print(f"more: {PROG} webhooks deliveries {args.webhook_id} --cursor {cursor}", file=sys.stderr)
        return 0

    return run_remote(args, WebhooksClient, work)


def cmd_webhooks_redeliver(args: argparse.Namespace) -> int:
    async def work(c: WebhooksClient) -> int:
        if not args.delivery_ids:
            n = await c.redeliver_dead(args.webhook_id)
            print(f"queued {n} dead deliver{'y' if n == 1 else 'ies'} of {args.webhook_id} again")
        for did in args.delivery_ids:
            await c.redeliver(args.webhook_id, did)
            print(f"queued delivery {did} again")
        return 0

    return run_remote(args, WebhooksClient, work)


def cmd_webhooks_test(args: argparse.Namespace) -> int:
    async def work(c: WebhooksClient) -> int:
        r = await c.test(args.webhook_id)
        if args.json:
            print(json_text(r))
        elif r["delivered"]:
            print(f"delivered ping {r['event_id']} to {args.webhook_id}: HTTP {r['http_status']} in {r['ms']} ms")
        else:
            error = " ".join(str(r["error"]).split())  # "HTTP 500", "unreachable": kept to one line
            print(f"{PROG}: error: ping to {args.webhook_id} not delivered: {error} ({r['ms']} ms)", file=sys.stderr)
        return 0 if r["delivered"] else 1

    return run_remote(args, WebhooksClient, work)


# --------------------------------------------------------------------------- parser


def _names(text: str) -> list[str]:
    """A comma list; the server checks the names, so a newer server's names work unchanged."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    return [] if names == ["all"] else names


def add_webhooks_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("webhooks", help="register webhook endpoints, read their delivery log, redeliver, test")
    # type(p): nested parsers get the CLI's one-line-error parser class without importing bridge.cli.
    wsub = p.add_subparsers(dest="webhooks_command",
                            metavar="{create,list,show,update,delete,deliveries,redeliver,test}",
                            parser_class=type(p))
    wsub.required = True
    common = remote_flags()

    def cmd(name: str, help: str, *, with_id: bool = True, json_out: bool = True) -> argparse.ArgumentParser:
        q = wsub.add_parser(name, help=help, parents=[common])
        if with_id:
            q.add_argument("webhook_id", metavar="ID")
        if json_out:
            q.add_argument("--json", action="store_true", help="print the API's JSON")
        q.set_defaults(command=f"webhooks.{name}")
        return q

    def spec_opts(q: argparse.ArgumentParser) -> None:
        q.add_argument("--secret", help="signing secret, 16-256 characters (create: default a generated whsec_...)")
        q.add_argument("--events", type=_names, metavar="A,B",
                       help=f"event types among {','.join(ALL_EVENT_TYPES)} (default {','.join(DEFAULT_EVENTS)})")
        q.add_argument("--sources", type=_names, metavar="A,B",
                       help=f"only jobs from these sources, among {','.join(SOURCES)}; 'all' (the default) for every one")
        q.add_argument("--description", help="free text, up to 500 characters")

    q = cmd("create", "register an endpoint; prints its secret, once", with_id=False)
    q.add_argument("endpoint_url", metavar="URL", help="the http(s) address that receives the POSTs")
    spec_opts(q)
    q.add_argument("--disabled", action="store_true", help="create it paused (events queue until enabled)")

    cmd("list", "the key's endpoints", with_id=False)
    cmd("show", "one endpoint")

    q = cmd("update", "change an endpoint's address, secret, events, sources, description or state")
    q.add_argument("--endpoint-url", metavar="URL", help="the new receiving address")
    spec_opts(q)
    state = q.add_mutually_exclusive_group()
    state.add_argument("--enable", dest="enabled", action="store_const", const=True, help="resume delivery")
    state.add_argument("--disable", dest="enabled", action="store_const", const=False,
                       help="pause delivery (events queue until enabled)")

    cmd("delete", "delete an endpoint and its delivery log", json_out=False)

    q = cmd("deliveries", "the delivery log, newest first")
    q.add_argument("--status", choices=["pending", "delivered", "dead"])
    q.add_argument("--job", metavar="JOB_ID", help="only this job's deliveries")
    q.add_argument("--limit", type=int, default=50, metavar="N", help="at most N deliveries, over pages (default 50)")
    q.add_argument("--cursor", help="continue from where a previous listing stopped")

    q = cmd("redeliver", "send deliveries again: the given ones, or every dead one", json_out=False)
    q.add_argument("delivery_ids", type=int, nargs="*", metavar="DELIVERY_ID")

    cmd("test", "POST a signed ping now; exit 1 if the receiver did not take it")


DISPATCH: dict[str, Callable[[argparse.Namespace], int]] = {
    "webhooks.create": cmd_webhooks_create,
    "webhooks.list": cmd_webhooks_list,
    "webhooks.show": cmd_webhooks_show,
    "webhooks.update": cmd_webhooks_update,
    "webhooks.delete": cmd_webhooks_delete,
    "webhooks.deliveries": cmd_webhooks_deliveries,
    "webhooks.redeliver": cmd_webhooks_redeliver,
    "webhooks.test": cmd_webhooks_test,
}
