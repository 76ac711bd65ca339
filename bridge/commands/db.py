"""`callbridge db status|migrate`: the database schema's version, and applying its migrations.

Both open the database that `storage.url` (or `--database-url`) names, by default
`<data_dir>/callbridge.db`, as `serve` and `keys` do. `status` only reads: the version, the
migrations applied (with when) and those pending. `migrate` applies the pending ones (an empty
database gets them all) under the backend's lock, so running it on several nodes at once, or
beside a starting `serve`, applies each once; run again it applies nothing. `serve` migrates at
start by itself; the other commands refuse a database that needs it (docs/storage.md).

Exit codes follow bridge/cli.py: 0 ok (whatever the version: `status` reports, it does not
judge), 2 bad input (no database there, unreachable, a schema newer than this code for `migrate`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from bridge.commands.usage import PROG, Parser as _Parser, UsageError
from bridge.config import ConfigError, add_config_flags, config_from_args
from bridge.stores import Migration, SchemaStatus, StoreNotFound, StoreUnavailable, migrate, schema_status, store_url

__all__ = ["DISPATCH", "add_db_parser"]

T = TypeVar("T")


def add_db_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database schema: version and migrations (storage.url)")
    add_config_flags(p)
    dsub = p.add_subparsers(dest="db_command", metavar="{status,migrate}", parser_class=_Parser)
    dsub.required = True
    for name, help in (("status", "the schema version, applied and pending migrations (reads only)"),
                       ("migrate", "apply the pending migrations (idempotent)")):
        # SUPPRESS: a config flag left out after the subcommand must not erase one given before it.
        q = dsub.add_parser(name, help=help, argument_default=argparse.SUPPRESS)
        add_config_flags(q)
        q.add_argument("--json", action="store_true", default=False, help="one JSON object instead of text")
        q.set_defaults(command=f"db.{name}")


def _run(ns: argparse.Namespace, action: Callable[[str], Awaitable[T]]) -> T:
    """`action(url)` on the database the config names; its errors as one line, exit 2."""
    try:
        url = store_url(config_from_args(ns))
    except ConfigError as e:
        raise UsageError(str(e)) from None

    async def run() -> T:
        try:
            return await action(url)
        except StoreNotFound as e:
            raise UsageError(f"no database at {e.where}: check --data-dir or --database-url "
                             f"(`{PROG} db migrate` creates the schema in an empty one)") from None
        except (ConfigError, StoreUnavailable) as e:
            raise UsageError(str(e)) from None

    return asyncio.run(run())


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _report(st: SchemaStatus) -> list[str]:
    lines = [f"database: {st.backend} {st.where}"]
    if st.too_new:
        lines.append(f"schema:   v{st.current}, newer than this code (v{st.latest}): "
                     f"run a release that knows it; this one refuses to open it")
    elif st.current == st.latest:
        lines.append(f"schema:   v{st.current} (up to date)")
    else:
        lines.append(f"schema:   v{st.current}, this code is at v{st.latest}")
    for i, a in enumerate(st.applied):
        lines.append(f"{'applied:' if i == 0 else '':<9} {a.version} {a.name:<12} {_when(a.applied_at)}")
    for i, m in enumerate(st.pending):
        lines.append(f"{'pending:' if i == 0 else '':<9} {m.version} {m.name}")
    if st.pending:
        lines.append(f"apply with `{PROG} db migrate` (`{PROG} serve` applies them at start)")
    return lines


def cmd_db_status(ns: argparse.Namespace) -> int:
    st = _run(ns, schema_status)
    print(json.dumps(st.to_dict(), indent=2) if ns.json else "\n".join(_report(st)))
    return 0


def cmd_db_migrate(ns: argparse.Namespace) -> int:
    async def apply(url: str) -> tuple[list[Migration], SchemaStatus]:
        return await migrate(url), await schema_status(url)

    done, st = _run(ns, apply)
    if ns.json:
        print(json.dumps({"applied_now": [{"version": m.version, "name": m.name} for m in done], **st.to_dict()},
                         indent=2))
        return 0
    for m in done:
        print(f"applied {m.version} {m.name}")
    if not done:
        print(f"nothing to apply: {st.backend} {st.where} is at v{st.current} (up to date)")
    else:
        print(f"{st.backend} {st.where} is at v{st.current} (up to date)")
    return 0


DISPATCH: dict[str, Callable[[argparse.Namespace], int]] = {
    "db.status": cmd_db_status,
    "db.migrate": cmd_db_migrate,
}
