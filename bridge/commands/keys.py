"""`callbridge keys create|list|revoke|credit|unlimited`: manage API keys in the service's database.

The commands open the key store that `storage.url` names (by default `<data_dir>/callbridge.db`,
the same file a running `serve` uses; SQLite WAL and IMMEDIATE transactions make that safe), so
they work with the service up or down and need no admin credential beyond access to the data.
Revoking takes effect on the next handshake; sessions already open run to their end.

The config flags (`--data-dir`, `--config`, ...) are accepted both before and after the
subcommand: `callbridge keys --data-dir D list` and `callbridge keys list --data-dir D`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from bridge.commands.output import table
from bridge.config import ConfigError, add_config_flags, config_from_args
from bridge.commands.usage import Parser as _Parser, UsageError
from bridge.stores import (ApiKey, KeyNotFound, KeyStore, SchemaOutdated, StoreNotFound, StoreUnavailable, open_stores,
                           store_url)

__all__ = ["DISPATCH", "add_keys_parser"]

PROG = "callbridge"
T = TypeVar("T")


def _usage(message: str) -> Exception:
    return UsageError(message)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_keys_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="create, list, revoke and credit API keys (local database)")
    add_config_flags(p)
    ksub = p.add_subparsers(dest="keys_command", metavar="{create,list,revoke,credit,unlimited}",
                            parser_class=_Parser)
    ksub.required = True

    def leaf(name: str, help: str) -> argparse.ArgumentParser:
        # SUPPRESS: a config flag left out after the subcommand must not erase one given before it.
        q = ksub.add_parser(name, help=help, argument_default=argparse.SUPPRESS)
        add_config_flags(q)
        q.set_defaults(command=f"keys.{name}")
        return q

    q = leaf("create", "create a key and print its secret (shown only once)")
    q.add_argument("--name", default=None, help="a label for the key")
    q.add_argument("--credits", type=_non_negative_int, default=None, metavar="C",
                   help="starting balance; omitted: unlimited")

    q = leaf("list", "list keys: id, name, prefix, created, revoked, balance, reserved")
    q.add_argument("--json", action="store_true", default=False, help="one JSON array instead of a table")

    q = leaf("revoke", "revoke a key (and every temporary token it minted)")
    q.add_argument("key_id", metavar="KEY_ID")

    q = leaf("credit", "add credits to a key (negative AMOUNT removes, never below 0)")
    q.add_argument("key_id", metavar="KEY_ID")
    q.add_argument("amount", type=int, metavar="AMOUNT")

    q = leaf("unlimited", "stop metering a key: no balance, never INSUFFICIENT_CREDITS")
    q.add_argument("key_id", metavar="KEY_ID")


def _run(ns: argparse.Namespace, action: Callable[[KeyStore], Awaitable[T]], *, create: bool = False) -> T:
    """Run `action` on the key store that `storage.url` names (the data dir's database by
    default), closing it after. Only `create` may start a new database: for the other commands
    a missing one almost always means a wrong --data-dir. None migrates an existing database:
    that is `serve`'s or `db migrate`'s (docs/storage.md, "Schema migrations")."""
    try:
        url = store_url(config_from_args(ns))
    except ConfigError as e:
        raise _usage(str(e)) from None

    async def run() -> T:
        try:
            stores = await open_stores(url, create=create, migrate=False)
        except ConfigError as e:
            raise _usage(str(e)) from None
        except SchemaOutdated as e:
            raise _usage(f"{e}: run `{PROG} db migrate` (or start `{PROG} serve`, which migrates)") from None
        except StoreNotFound as e:
            raise _usage(f"no database at {e.where}: check --data-dir "
                         f"(`{PROG} serve` or `{PROG} keys create` makes one)") from None
        except StoreUnavailable as e:
            raise _usage(str(e)) from None
        try:
            return await action(stores.keys)
        finally:
            await stores.close()

    return asyncio.run(run())


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _balance(key: ApiKey) -> str:
    return "unlimited" if key.balance is None else str(key.balance)


def cmd_keys_create(ns: argparse.Namespace) -> int:
    key, secret = _run(ns, lambda keys: keys.create_key(name=ns.name, credits=ns.credits), create=True)
    print(f"id:      {key.id}")
    print(f"secret:  {secret}")
    print(f"credits: {_balance(key)}")
    print("The secret is shown only this once (only its hash is stored): keep it now.")
    return 0


def cmd_keys_list(ns: argparse.Namespace) -> int:
    keys = _run(ns, lambda store: store.list_keys())
    if ns.json:
        print(json.dumps([{"id": k.id, "name": k.name, "prefix": k.prefix, "created_at": k.created_at,
                           "revoked_at": k.revoked_at, "balance": k.balance, "reserved": k.reserved}
                          for k in keys], indent=2))
        return 0
    if not keys:
        print(f"no keys (create one with `{PROG} keys create`)")
        return 0
    rows = [(k.id, k.name or "-", k.prefix + "…", _when(k.created_at), _when(k.revoked_at), _balance(k),
             str(k.reserved)) for k in keys]
    print("\n".join(table(("ID", "NAME", "PREFIX", "CREATED", "REVOKED", "BALANCE", "RESERVED"), rows)))
    return 0


def cmd_keys_revoke(ns: argparse.Namespace) -> int:
    async def revoke(store: KeyStore) -> tuple[bool, ApiKey | None]:
        if await store.revoke(ns.key_id):
            return True, None
        return False, await store.get_key(ns.key_id)

    revoked, key = _run(ns, revoke)
    if revoked:
        print(f"revoked {ns.key_id}: new sessions with it (or its temporary tokens) are refused")
        return 0
    if key is None:
        raise _usage(f"no API key {ns.key_id!r} (see `{PROG} keys list`)")
    print(f"{ns.key_id} was already revoked at {_when(key.revoked_at)}")
    return 0


def cmd_keys_credit(ns: argparse.Namespace) -> int:
    async def credit(store: KeyStore) -> tuple[int, ApiKey | None]:
        try:
            balance = await store.add_credits(ns.key_id, ns.amount)
        except KeyNotFound:
            raise _usage(f"no API key {ns.key_id!r} (see `{PROG} keys list`)") from None
        except ValueError as e:
            raise _usage(str(e)) from None
        return balance, await store.get_key(ns.key_id)

    balance, key = _run(ns, credit)
    reserved = key.reserved if key else 0
    print(f"{ns.key_id}: balance {balance} credits" + (f" ({reserved} reserved by live sessions)" if reserved else ""))
    return 0


def cmd_keys_unlimited(ns: argparse.Namespace) -> int:
    async def unlimited(store: KeyStore) -> None:
        try:
            await store.set_unlimited(ns.key_id)
        except KeyNotFound:
            raise _usage(f"no API key {ns.key_id!r} (see `{PROG} keys list`)") from None

    _run(ns, unlimited)
    print(f"{ns.key_id}: unlimited credits")
    return 0


DISPATCH: dict[str, Callable[[argparse.Namespace], int]] = {
    "keys.create": cmd_keys_create,
    "keys.list": cmd_keys_list,
    "keys.revoke": cmd_keys_revoke,
    "keys.credit": cmd_keys_credit,
    "keys.unlimited": cmd_keys_unlimited,
}
