"""The key store's interface: API keys (stored hashed), temporary tokens and credit reservations.

Async for the same reason as the job store (bridge/stores/jobs.py). The methods that decide
(`reserve`, `settle`, `consume_temp_token`, `add_credits`) are each one transaction whose check
and write cannot interleave with another process's: the service and `callbridge keys` share the
store. SQLite gets that from BEGIN IMMEDIATE; a PostgreSQL backend locks the key (or token) row
with SELECT ... FOR UPDATE inside the transaction.

The model and errors live here, below `bridge.auth`, because the store produces them and the
CLI, the session admission and the authenticator all consume them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "KEY_PREFIX",
    "TEMP_TOKEN_RETENTION_S",
    "ApiKey",
    "InsufficientCredits",
    "KeyNotFound",
    "KeyStore",
    "TokenRefused",
    "credited_balance",
    "display_prefix",
    "hash_secret",
    "key_id_for",
    "settle_orphans",
]

KEY_PREFIX = "cbk_"  # API keys
# A spent or expired token row is kept this long so a replay is told "reused"/"expired",
# not just "invalid"; older rows are purged when new tokens are minted.
TEMP_TOKEN_RETENTION_S = 86400.0


class InsufficientCredits(Exception):
    """The key's available balance (balance minus open reservations) is below what is needed."""

    def __init__(self, balance: int, needed: int) -> None:
        super().__init__(f"balance {balance} credits, {needed} needed")
        self.balance = balance
        self.needed = needed


class KeyNotFound(LookupError):
    """No API key has this id (admin operations: revoke, credit, mint)."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"no API key with id {key_id!r}")
        self.key_id = key_id


class TokenRefused(Exception):
    """A temporary token cannot be used or minted; `code` is the API's error code
    (INVALID_CREDENTIALS, TOKEN_REUSED, TOKEN_EXPIRED, KEY_REVOKED). bridge.auth turns it into
    its 401."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ApiKey:
    """A stored key, without its secret (only the hash is kept, and not exposed here)."""

    id: str
    name: str | None
    prefix: str  # first characters of the secret, to recognize it in a list; not enough to use it
    created_at: float
    revoked_at: float | None = None
    balance: int | None = None  # credits; None = unlimited
    reserved: int = 0  # credits held by open reservations (live sessions)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def available(self) -> int | None:
        """What a new session may reserve; None = unlimited."""
        return None if self.balance is None else self.balance - self.reserved


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a key or token.

    A plain fast hash is right here, unlike for passwords: generated keys and tokens carry 256
    bits from `secrets`, so there is nothing to brute-force, and a slow KDF would cost every
    request. (Keys given in config are the operator's choice; they must be >= 16 characters.)
    Lookups go by hash, so the database never holds anything that authenticates.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def key_id_for(secret: str) -> str:
    """Stable public id of a key (a config key keeps its id across restarts)."""
    return "key_" + hash_secret(secret)[:16]


def display_prefix(secret: str) -> str:
    """Long (generated) keys show "cbk_" plus 4 random characters; short config keys show less."""
    return secret[:8] if len(secret) >= 32 else secret[:4]


def credited_balance(key_id: str, balance: int | None, amount: int) -> int:
    """The balance after `add_credits(amount)` on a key holding `balance` (None: unlimited), the
    rule every backend applies inside its transaction: crediting an unlimited key meters it at
    `amount`; ValueError for a negative amount on an unlimited key or a balance going below 0."""
    if balance is None:
        if amount < 0:
            raise ValueError(f"{key_id} has unlimited credits; a negative adjustment needs a balance")
        return amount
    new = balance + amount
    if new < 0:
        raise ValueError(f"{key_id} has {balance} credits; removing {-amount} would go below 0")
    return new


async def settle_orphans(store: "KeyStore", used_for: Callable[[str], Awaitable[int]],
                         only: Callable[[Collection[str]], Awaitable[Collection[str]]] | None = None) -> int:
    """`KeyStore.settle_orphans` from the store's own reservations and settle: each open
    reservation is charged what `used_for(job_id)` says the job used. `only`, given the open
    reservations' job ids, returns those that are orphans (in a cluster: no live session on any
    node holds them); it is asked after the reservations are read, so a session admitted in
    between (its live-session row comes before its reservation) is never taken for one."""
    orphans = list(await store.open_reservations())
    if only is not None:
        orphans = [job_id for job_id in await only(orphans) if job_id in orphans]
    for job_id in orphans:
        await store.settle(job_id, await used_for(job_id))
    return len(orphans)


class KeyStore(Protocol):
    # -- keys ----------------------------------------------------------------------------------

    async def create_key(self, name: str | None = None, credits: int | None = None) -> tuple[ApiKey, str]:
        """A new random key; returns the record and the secret (stored only as a hash, shown
        once). `credits` None = unlimited; negative: ValueError."""

    async def ensure_keys(self, secrets: Iterable[str]) -> None:
        """Import keys given in config, idempotently, unlimited; an existing (even revoked) key
        is left as it is. A secret that could never authenticate: ValueError."""

    async def active_key_count(self) -> int: ...

    async def list_keys(self) -> list[ApiKey]:
        """Oldest first."""

    async def get_key(self, key_id: str) -> ApiKey | None: ...

    async def verify_key(self, secret: str) -> ApiKey | None:
        """The key this secret belongs to (revoked ones too), by hash; else None."""

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key and every token it minted; False if unknown or already revoked."""

    async def add_credits(self, key_id: str, amount: int) -> int:
        """Add (negative: remove) credits; returns the new balance. KeyNotFound; ValueError when
        the balance would go below 0 or a debit hits an unlimited key."""

    async def set_unlimited(self, key_id: str) -> None:
        """Stop metering a key; KeyNotFound."""

    # -- temporary tokens ----------------------------------------------------------------------

    async def mint_temp_token(self, key_id: str, expires_in: int) -> tuple[str, float]:
        """A single-use token acting as `key_id`; returns (token, expires_at). KeyNotFound;
        TokenRefused(KEY_REVOKED); ValueError for expires_in <= 0."""

    async def consume_temp_token(self, token: str, *, spend: bool = True) -> str:
        """Check and (unless `spend=False`) mark used in one transaction, so two concurrent
        handshakes cannot both win; returns the minting key's id, or raises TokenRefused."""

    async def release_temp_token(self, token_hash: str) -> None:
        """Make a claimed token usable again (its session never opened)."""

    # -- credits -------------------------------------------------------------------------------

    async def reserve(self, owner: str, job_id: str, credits: int) -> None:
        """Hold `credits` against a metered key before any audio; InsufficientCredits when the
        balance minus open reservations is short. Unmetered, JWT and unknown owners: nothing
        recorded. A second reservation for one job: ValueError."""

    async def settle(self, job_id: str, used: int) -> None:
        """Close a job's reservation charging what it `used` (balance floored at 0), in one
        transaction with the reservation's removal. Idempotent; no-op without a reservation."""

    async def open_reservations(self) -> dict[str, int]:
        """job_id -> credits held, for reservations not settled yet."""

    async def settle_orphans(self, used_for: Callable[[str], Awaitable[int]],
                             only: Callable[[Collection[str]], Awaitable[Collection[str]]] | None = None) -> int:
        """Settle reservations a crash left open, charging `await used_for(job_id)`; returns how
        many. `only` picks the orphans among the open reservations' job ids (see `settle_orphans`
        above); None: all of them (one node that just started)."""

    async def close(self) -> None: ...
