"""API keys, temporary tokens and credit reservations in PostgreSQL: bridge.stores.KeyStore on the
shared pool (pool.py). The tables are defined by the migrations (migrations.py).

The decisions hold across connections and nodes: `reserve` and `add_credits` lock the key row
(SELECT ... FOR UPDATE) before reading the balance and open holds, so two reservations against one
key are serialized and the second sees the first's hold; `consume_temp_token` locks the token row,
so of two concurrent handshakes the second sees the first's `used_at` and is refused.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

import psycopg

from bridge.keyformat import TEMP_PREFIX, config_key_problem
from bridge.stores.keys import (
    KEY_PREFIX,
    TEMP_TOKEN_RETENTION_S,
    ApiKey,
    InsufficientCredits,
    KeyNotFound,
    TokenRefused,
    credited_balance,
    settle_orphans,
    display_prefix,
    hash_secret,
    key_id_for,
)
from bridge.stores.postgres.pool import Pool

__all__ = ["PgKeyStore"]

_KEY_COLUMNS = ("k.id, k.name, k.prefix, k.created_at, k.revoked_at, k.balance, "
                "COALESCE((SELECT SUM(r.credits) FROM credit_reservations r WHERE r.owner = k.id), 0) AS reserved")


def _row_key(r: dict[str, Any]) -> ApiKey:
    return ApiKey(id=r["id"], name=r["name"], prefix=r["prefix"], created_at=r["created_at"],
                  revoked_at=r["revoked_at"], balance=r["balance"], reserved=int(r["reserved"]))


class PgKeyStore:
    """bridge.stores.KeyStore in PostgreSQL. `clock` is injectable, as in the SQLite store."""

    def __init__(self, pool: Pool, *, clock: Callable[[], float] = time.time) -> None:
        self._pool = pool
        self.clock = clock

    # -- keys ----------------------------------------------------------------------------------

    async def create_key(self, name: str | None = None, credits: int | None = None) -> tuple[ApiKey, str]:
        if credits is not None and credits < 0:
            raise ValueError(f"credits must be >= 0, got {credits}")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(id=key_id_for(secret), name=name, prefix=display_prefix(secret),
                     created_at=self.clock(), balance=credits)
        async with self._pool.tx() as db:
            await db.execute(
                "INSERT INTO api_keys (id, key_hash, prefix, name, created_at, balance) VALUES (%s,%s,%s,%s,%s,%s)",
                (key.id, hash_secret(secret), key.prefix, name, key.created_at, credits))
        return key, secret

    async def ensure_keys(self, secrets: Iterable[str]) -> None:
        now = self.clock()
        rows = []
        for secret in secrets:
            problem = config_key_problem(secret)
            if problem:
                raise ValueError(f"server.api_keys: {problem}")
            rows.append((key_id_for(secret), hash_secret(secret), display_prefix(secret), "config", now))
        if not rows:
            return
        async with self._pool.tx() as db, db.cursor() as cur:
            await cur.executemany(
                "INSERT INTO api_keys (id, key_hash, prefix, name, created_at) VALUES (%s,%s,%s,%s,%s)"
                " ON CONFLICT DO NOTHING", rows)

    async def active_key_count(self) -> int:
        async with self._pool.tx() as db:
            r = await (await db.execute("SELECT COUNT(*) AS n FROM api_keys WHERE revoked_at IS NULL")).fetchone()
        return int(r["n"])

    async def list_keys(self) -> list[ApiKey]:
        async with self._pool.tx() as db:
            rows = await (await db.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys k ORDER BY k.created_at, k.id")
                          ).fetchall()
        return [_row_key(r) for r in rows]

    async def get_key(self, key_id: str) -> ApiKey | None:
        async with self._pool.tx() as db:
            r = await (await db.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys k WHERE k.id = %s", (key_id,))
                       ).fetchone()
        return _row_key(r) if r else None

    async def verify_key(self, secret: str) -> ApiKey | None:
        async with self._pool.tx() as db:
            r = await (await db.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys k WHERE k.key_hash = %s",
                                        (hash_secret(secret),))).fetchone()
        return _row_key(r) if r else None

    async def revoke(self, key_id: str) -> bool:
        async with self._pool.tx() as db:
            cur = await db.execute("UPDATE api_keys SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL",
                                   (self.clock(), key_id))
            return cur.rowcount == 1

    async def add_credits(self, key_id: str, amount: int) -> int:
        async with self._pool.tx() as db:
            r = await (await db.execute("SELECT balance FROM api_keys WHERE id = %s FOR UPDATE", (key_id,))
                       ).fetchone()
            if r is None:
                raise KeyNotFound(key_id)
            new = credited_balance(key_id, r["balance"], amount)
            await db.execute("UPDATE api_keys SET balance = %s WHERE id = %s", (new, key_id))
        return new

    async def set_unlimited(self, key_id: str) -> None:
        async with self._pool.tx() as db:
            cur = await db.execute("UPDATE api_keys SET balance = NULL WHERE id = %s", (key_id,))
            if cur.rowcount != 1:
                raise KeyNotFound(key_id)

    # -- temporary tokens ----------------------------------------------------------------------

    async def mint_temp_token(self, key_id: str, expires_in: int) -> tuple[str, float]:
        if expires_in <= 0:
            raise ValueError(f"expires_in must be > 0, got {expires_in}")
        token = TEMP_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        expires_at = now + expires_in
        async with self._pool.tx() as db:
            # FOR SHARE: a revoke committing meanwhile waits, so no token outlives its key's revocation.
            r = await (await db.execute("SELECT revoked_at FROM api_keys WHERE id = %s FOR SHARE", (key_id,))
                       ).fetchone()
            if r is None:
                raise KeyNotFound(key_id)
            if r["revoked_at"] is not None:
                raise TokenRefused("KEY_REVOKED", f"API key {key_id} was revoked; it cannot mint tokens")
            await db.execute("DELETE FROM temp_tokens WHERE expires_at < %s", (now - TEMP_TOKEN_RETENTION_S,))
            await db.execute("INSERT INTO temp_tokens (token_hash, key_id, created_at, expires_at)"
                             " VALUES (%s,%s,%s,%s)", (hash_secret(token), key_id, now, expires_at))
        return token, expires_at

    async def consume_temp_token(self, token: str, *, spend: bool = True) -> str:
        now = self.clock()
        token_hash = hash_secret(token)
        async with self._pool.tx() as db:
            # FOR UPDATE OF t: a concurrent handshake waits here, then reads the row as the winner
            # left it (used_at set) and is refused as reused.
            r = await (await db.execute(
                "SELECT t.key_id, t.expires_at, t.used_at, k.revoked_at FROM temp_tokens t"
                " LEFT JOIN api_keys k ON k.id = t.key_id WHERE t.token_hash = %s"
                + (" FOR UPDATE OF t" if spend else ""), (token_hash,))).fetchone()
            if r is None:
                raise TokenRefused("INVALID_CREDENTIALS", "unknown temporary token (mint one with POST /v1/tokens)")
            if r["used_at"] is not None:
                raise TokenRefused("TOKEN_REUSED", "this temporary token was already used (or another connection is "
                                                   "opening a session with it); a temporary token opens one "
                                                   "session only, mint a new one")
            if r["expires_at"] <= now:
                raise TokenRefused("TOKEN_EXPIRED", "this temporary token has expired; mint a new one")
            if r["revoked_at"] is not None:
                raise TokenRefused("KEY_REVOKED", f"the API key that minted this token ({r['key_id']}) was revoked")
            if spend:
                await db.execute("UPDATE temp_tokens SET used_at = %s WHERE token_hash = %s", (now, token_hash))
        return r["key_id"]

    async def release_temp_token(self, token_hash: str) -> None:
        async with self._pool.tx() as db:
            await db.execute("UPDATE temp_tokens SET used_at = NULL WHERE token_hash = %s", (token_hash,))

    # -- credits -------------------------------------------------------------------------------

    async def reserve(self, owner: str, job_id: str, credits: int) -> None:
        if credits < 0:
            raise ValueError(f"credits must be >= 0, got {credits}")
        async with self._pool.tx() as db:
            # The key row's lock serializes reservations against one key across every connection:
            # the next one reads the holds after this one committed its own.
            r = await (await db.execute("SELECT balance FROM api_keys WHERE id = %s FOR UPDATE", (owner,))
                       ).fetchone()
            if r is None or r["balance"] is None:
                return
            held = (await (await db.execute(
                "SELECT COALESCE(SUM(credits), 0) AS held FROM credit_reservations WHERE owner = %s", (owner,))
            ).fetchone())["held"]
            available = r["balance"] - int(held)
            if available < credits:
                raise InsufficientCredits(available, credits)
            try:
                await db.execute("INSERT INTO credit_reservations (job_id, owner, credits, created_at)"
                                 " VALUES (%s,%s,%s,%s)", (job_id, owner, credits, self.clock()))
            except psycopg.errors.UniqueViolation:
                raise ValueError(f"job {job_id} already holds a credit reservation") from None

    async def settle(self, job_id: str, used: int) -> None:
        used = max(0, int(used))
        async with self._pool.tx() as db:
            # DELETE ... RETURNING takes the reservation once: a concurrent settle finds nothing.
            r = await (await db.execute("DELETE FROM credit_reservations WHERE job_id = %s RETURNING owner",
                                        (job_id,))).fetchone()
            if r is None:
                return
            await db.execute("UPDATE api_keys SET balance = GREATEST(0, balance - %s) WHERE id = %s"
                             " AND balance IS NOT NULL", (used, r["owner"]))

    async def open_reservations(self) -> dict[str, int]:
        async with self._pool.tx() as db:
            rows = await (await db.execute("SELECT job_id, credits FROM credit_reservations")).fetchall()
        return {r["job_id"]: int(r["credits"]) for r in rows}

    async def settle_orphans(self, used_for: Callable[[str], Awaitable[int]],
                             only: Callable[[Collection[str]], Awaitable[Collection[str]]] | None = None) -> int:
        return await settle_orphans(self, used_for, only)

    async def close(self) -> None:
        await self._pool.release()
