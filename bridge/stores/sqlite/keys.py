"""API keys, temporary tokens and credit reservations in SQLite: the blocking implementation
behind bridge.stores.KeyStore (its own tables in the service's database file).
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable

from bridge.keyformat import TEMP_PREFIX, config_key_problem
from bridge.stores.keys import (
    KEY_PREFIX,
    TEMP_TOKEN_RETENTION_S,
    ApiKey,
    InsufficientCredits,
    KeyNotFound,
    TokenRefused,
    credited_balance,
    display_prefix,
    hash_secret,
    key_id_for,
)
from bridge.stores.sqlite import migrations
from bridge.stores.sqlite.db import Tx, connect

__all__ = ["SqliteKeyStore"]

_KEY_COLUMNS = ("k.id, k.name, k.prefix, k.created_at, k.revoked_at, k.balance, "
                "COALESCE((SELECT SUM(r.credits) FROM credit_reservations r WHERE r.owner = k.id), 0) AS reserved")


def _row_key(r: sqlite3.Row) -> ApiKey:
    return ApiKey(id=r["id"], name=r["name"], prefix=r["prefix"], created_at=r["created_at"],
                  revoked_at=r["revoked_at"], balance=r["balance"], reserved=int(r["reserved"]))


class SqliteKeyStore:
    """API keys, temporary tokens and credit reservations in SQLite.

    Blocking methods (the service reaches them through ThreadedKeyStore). One connection
    shared behind a lock; read-modify-write runs in
    BEGIN IMMEDIATE so two processes (the service and `callbridge keys`) never interleave.
    `clock` is injectable so expiry can be tested without waiting.
    """

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self.clock = clock
        self._lock = threading.Lock()
        self._db = connect(self.path)
        with self._lock:
            migrations.apply(self._db, self.path)  # opened alone it migrates; after open_stores: current

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- keys ----------------------------------------------------------------------------------

    def create_key(self, name: str | None = None, credits: int | None = None) -> tuple[ApiKey, str]:
        """A new random key; returns the record and the secret, which is not stored and shown once.

        `credits` None = unlimited."""
        if credits is not None and credits < 0:
            raise ValueError(f"credits must be >= 0, got {credits}")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(id=key_id_for(secret), name=name, prefix=display_prefix(secret),
                     created_at=self.clock(), balance=credits)
        with self._lock, Tx(self._db):
            self._db.execute(
                "INSERT INTO api_keys (id, key_hash, prefix, name, created_at, balance) VALUES (?,?,?,?,?,?)",
                (key.id, hash_secret(secret), key.prefix, name, key.created_at, credits))
        return key, secret

    def ensure_keys(self, secrets: Iterable[str]) -> None:
        """Import keys given in config, idempotently, with unlimited credits.

        An existing key is left as it is: a key revoked with `callbridge keys revoke` stays
        revoked even while it is still listed in config (revocation must win).
        """
        now = self.clock()
        rows = []
        for secret in secrets:
            problem = config_key_problem(secret)
            if problem:
                raise ValueError(f"server.api_keys: {problem}")
            rows.append((key_id_for(secret), hash_secret(secret), display_prefix(secret), "config", now))
        if not rows:
            return
        with self._lock, Tx(self._db):
            self._db.executemany(
                "INSERT OR IGNORE INTO api_keys (id, key_hash, prefix, name, created_at) VALUES (?,?,?,?,?)", rows)

    def active_key_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()[0]

    def list_keys(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys k ORDER BY k.created_at, k.id").fetchall()
        return [_row_key(r) for r in rows]

    def get_key(self, key_id: str) -> ApiKey | None:
        with self._lock:
            r = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys k WHERE k.id = ?", (key_id,)).fetchone()
        return _row_key(r) if r else None

    def verify_key(self, secret: str) -> ApiKey | None:
        """The key this secret belongs to (revoked ones too: the caller says "revoked"), else None.

        The lookup is by hash, so timing reveals nothing about stored secrets."""
        with self._lock:
            r = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys k WHERE k.key_hash = ?",
                                 (hash_secret(secret),)).fetchone()
        return _row_key(r) if r else None

    def revoke(self, key_id: str) -> bool:
        """Revoke a key (and so every temporary token it minted). False if unknown or already revoked.

        Live sessions opened with it run to their end; new ones are refused."""
        with self._lock, Tx(self._db):
            cur = self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                                   (self.clock(), key_id))
        return cur.rowcount == 1

    def add_credits(self, key_id: str, amount: int) -> int:
        """Add (or, negative, remove) credits; returns the new balance.

        Crediting an unlimited key gives it a balance of `amount` (it becomes metered); a
        negative amount on an unlimited key, or one taking a balance below 0, is refused
        with ValueError. `set_unlimited` undoes metering.
        """
        with self._lock, Tx(self._db):
            r = self._db.execute("SELECT balance FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if r is None:
                raise KeyNotFound(key_id)
            new = credited_balance(key_id, r["balance"], amount)
            self._db.execute("UPDATE api_keys SET balance = ? WHERE id = ?", (new, key_id))
        return new

    def set_unlimited(self, key_id: str) -> None:
        """Stop metering a key: no balance, no reservations checked."""
        with self._lock, Tx(self._db):
            cur = self._db.execute("UPDATE api_keys SET balance = NULL WHERE id = ?", (key_id,))
            if cur.rowcount != 1:
                raise KeyNotFound(key_id)

    # -- temporary tokens ----------------------------------------------------------------------

    def mint_temp_token(self, key_id: str, expires_in: int) -> tuple[str, float]:
        """A single-use token acting as `key_id` until it expires; returns (token, expires_at).

        Only the hash is stored. The range a client may ask for is the REST route's concern;
        here any positive lifetime is accepted (tests use short ones)."""
        if expires_in <= 0:
            raise ValueError(f"expires_in must be > 0, got {expires_in}")
        token = TEMP_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        expires_at = now + expires_in
        with self._lock, Tx(self._db):
            r = self._db.execute("SELECT revoked_at FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if r is None:
                raise KeyNotFound(key_id)
            if r["revoked_at"] is not None:
                raise TokenRefused("KEY_REVOKED", f"API key {key_id} was revoked; it cannot mint tokens")
            self._db.execute("DELETE FROM temp_tokens WHERE expires_at < ?", (now - TEMP_TOKEN_RETENTION_S,))
            self._db.execute("INSERT INTO temp_tokens (token_hash, key_id, created_at, expires_at) VALUES (?,?,?,?)",
                             (hash_secret(token), key_id, now, expires_at))
        return token, expires_at

    def consume_temp_token(self, token: str, *, spend: bool = True) -> str:
        """Spend a temporary token: returns the id of the key that minted it.

        Check and mark-used happen in one IMMEDIATE transaction, so two concurrent handshakes
        with the same token cannot both succeed. `spend=False` only checks it (a plain GET of
        the stream URL is told what is wrong with its token without burning a good one)."""
        now = self.clock()
        with self._lock, Tx(self._db):
            r = self._db.execute(
                "SELECT t.key_id, t.expires_at, t.used_at, k.revoked_at FROM temp_tokens t "
                "LEFT JOIN api_keys k ON k.id = t.key_id WHERE t.token_hash = ?", (hash_secret(token),)).fetchone()
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
                self._db.execute("UPDATE temp_tokens SET used_at = ? WHERE token_hash = ?", (now, hash_secret(token)))
        return r["key_id"]

    def release_temp_token(self, token_hash: str) -> None:
        """Give back a token that an ingest route claimed (spent) but that opened no session: its
        `start` or offer was refused, or the client left before sending one. Only the claimer
        calls this (a concurrent use was refused as reused), so the token is usable again until
        it expires."""
        with self._lock, Tx(self._db):
            self._db.execute("UPDATE temp_tokens SET used_at = NULL WHERE token_hash = ?", (token_hash,))

    # -- credits -------------------------------------------------------------------------------

    def reserve(self, owner: str, job_id: str, credits: int) -> None:
        """Hold `credits` (the session's maximum cost) against a metered key before any audio.

        Raises InsufficientCredits when balance minus open reservations is short. Unlimited
        keys, JWT owners and unknown owners are not metered: nothing is recorded."""
        if credits < 0:
            raise ValueError(f"credits must be >= 0, got {credits}")
        with self._lock, Tx(self._db):
            r = self._db.execute("SELECT balance FROM api_keys WHERE id = ?", (owner,)).fetchone()
            if r is None or r["balance"] is None:
                return
            held = self._db.execute("SELECT COALESCE(SUM(credits), 0) FROM credit_reservations WHERE owner = ?",
                                    (owner,)).fetchone()[0]
            available = r["balance"] - held
            if available < credits:
                raise InsufficientCredits(available, credits)
            try:
                self._db.execute("INSERT INTO credit_reservations (job_id, owner, credits, created_at) "
                                 "VALUES (?,?,?,?)", (job_id, owner, credits, self.clock()))
            except sqlite3.IntegrityError:
                raise ValueError(f"job {job_id} already holds a credit reservation") from None

    def settle(self, job_id: str, used: int) -> None:
        """Close a job's reservation, charging what it actually `used` (not what was held).

        Idempotent, and a no-op for jobs without a reservation. The balance is floored at 0:
        a session never costs more than its key had when it started, minus admin debits since."""
        used = max(0, int(used))
        with self._lock, Tx(self._db):
            r = self._db.execute("SELECT owner FROM credit_reservations WHERE job_id = ?", (job_id,)).fetchone()
            if r is None:
                return
            self._db.execute("DELETE FROM credit_reservations WHERE job_id = ?", (job_id,))
            self._db.execute("UPDATE api_keys SET balance = MAX(0, balance - ?) WHERE id = ? AND balance IS NOT NULL",
                             (used, r["owner"]))

    def open_reservations(self) -> dict[str, int]:
        """job_id -> credits held, for reservations not settled yet."""
        with self._lock:
            rows = self._db.execute("SELECT job_id, credits FROM credit_reservations").fetchall()
        return {r["job_id"]: r["credits"] for r in rows}

    def settle_orphans(self, used_for: Callable[[str], int]) -> int:
        """At startup, settle reservations a crash left open, charging `used_for(job_id)`
        (the audio the job saved). Returns how many were settled."""
        orphans = self.open_reservations()
        for job_id in orphans:
            self.settle(job_id, used_for(job_id))  # used_for reads the job store: not under our lock
        return len(orphans)
