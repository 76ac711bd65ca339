"""Credentials: API keys (stored hashed), JWTs (HS256/RS256) and single-use temporary tokens.

Three kinds of credential reach the service:

- API keys (`cbk_...`), created by `callbridge keys create`, by `serve` on first start, or given
  in config (`CALLBRIDGE_API_KEYS`). Only a hash is stored. A key owns its jobs, its session limit
  and, optionally, a credit balance.
- JWTs signed by an operator's identity system, HS256 (shared secret) or RS256 (public key PEM).
  `exp` and `sub` are required, `nbf` and `aud` (and `iss` when configured) are checked; the
  owner is `jwt:<sub>`, never limited by credits.
- Temporary tokens (`cbt_...`) minted by `POST /v1/tokens` with an API key, so a browser can open
  one ingest session (stream socket or WebRTC offer) without ever holding the key. Single use,
  short-lived, refused everywhere else without being spent; their principal is the key that
  minted them. The ingest route claims the token when it authenticates and gives it back
  (`release_temp_token`) when no session opened: a refused `start` or offer does not burn it.

`KeyStore` keeps keys, tokens and credit reservations in the service's SQLite database (its own
tables, next to the job store's). `Authenticator` turns a request into a `Principal` or raises
`AuthError` (HTTP 401, JSON body), before any WebSocket upgrade.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.backoff import AuthBackoff
from bridge.config import AuthConfig
from bridge.db import Tx as _Tx
from bridge.db import connect
from bridge.keyformat import JWT_SHAPE, MIN_CONFIG_KEY_CHARS, TEMP_PREFIX, config_key_problem

__all__ = [
    "KEY_FILE_NAME",
    "KEY_PREFIX",
    "MIN_CONFIG_KEY_CHARS",
    "MIN_HS256_SECRET_BYTES",
    "TEMP_PREFIX",
    "ApiKey",
    "AuthError",
    "Authenticator",
    "InsufficientCredits",
    "KeyNotFound",
    "KeyStore",
    "Principal",
    "bootstrap_key",
    "config_key_problem",
    "hash_secret",
    "key_id_for",
]

KEY_PREFIX = "cbk_"  # API keys
KEY_FILE_NAME = "api_key"  # the generated key, in the data dir
MIN_HS256_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key MUST be at least 256 bits
MIN_RSA_BITS = 2048
MAX_CREDENTIAL_CHARS = 8192  # far above any key, token or JWT of ours; keeps hashing and parsing bounded
JWT_ALGORITHMS = ("HS256", "RS256")
# A spent or expired token row is kept this long so a replay is told "reused"/"expired",
# not just "invalid"; older rows are purged when new tokens are minted.
TEMP_TOKEN_RETENTION_S = 86400.0

@dataclass(frozen=True)
class Principal:
    """Who is calling. `owner` scopes jobs, session limits and credits."""

    owner: str  # API key id ("key_..."), or "jwt:<sub>" for JWTs
    kind: str  # "api_key" | "jwt" | "temp_token"
    key_id: str | None = None  # the API key behind it (temp tokens: the key that minted them)
    subject: str | None = None  # JWT `sub`
    # temporary tokens: the hash of the token (not a credential), so an ingest route that claimed it
    # can give it back when no session opened
    token_hash: str | None = field(default=None, compare=False, repr=False)


class AuthError(Exception):
    """Refused credentials: HTTP 401 with a JSON body, before any WebSocket upgrade."""

    status = 401

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


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


def _display_prefix(secret: str) -> str:
    # Long (generated) keys show "cbk_" plus 4 random characters; short config keys show less.
    return secret[:8] if len(secret) >= 32 else secret[:4]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    name TEXT,
    created_at REAL NOT NULL,
    revoked_at REAL,
    balance INTEGER
);
CREATE TABLE IF NOT EXISTS temp_tokens (
    token_hash TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE INDEX IF NOT EXISTS temp_tokens_expires ON temp_tokens (expires_at);
CREATE TABLE IF NOT EXISTS credit_reservations (
    job_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    credits INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS credit_reservations_owner ON credit_reservations (owner);
"""

_KEY_COLUMNS = ("k.id, k.name, k.prefix, k.created_at, k.revoked_at, k.balance, "
                "COALESCE((SELECT SUM(r.credits) FROM credit_reservations r WHERE r.owner = k.id), 0) AS reserved")


def _row_key(r: sqlite3.Row) -> ApiKey:
    return ApiKey(id=r["id"], name=r["name"], prefix=r["prefix"], created_at=r["created_at"],
                  revoked_at=r["revoked_at"], balance=r["balance"], reserved=int(r["reserved"]))


class KeyStore:
    """API keys, temporary tokens and credit reservations in SQLite.

    Blocking methods (async callers use `asyncio.to_thread`; single indexed lookups are cheap
    enough to run on the loop). One connection shared behind a lock; read-modify-write runs in
    BEGIN IMMEDIATE so two processes (the service and `callbridge keys`) never interleave.
    `clock` is injectable so expiry can be tested without waiting.
    """

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self.clock = clock
        self._lock = threading.Lock()
        self._db = connect(self.path)
        with self._lock:
            with _Tx(self._db):
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)

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
        key = ApiKey(id=key_id_for(secret), name=name, prefix=_display_prefix(secret),
                     created_at=self.clock(), balance=credits)
        with self._lock, _Tx(self._db):
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
            rows.append((key_id_for(secret), hash_secret(secret), _display_prefix(secret), "config", now))
        if not rows:
            return
        with self._lock, _Tx(self._db):
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
        with self._lock, _Tx(self._db):
            cur = self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                                   (self.clock(), key_id))
        return cur.rowcount == 1

    def add_credits(self, key_id: str, amount: int) -> int:
        """Add (or, negative, remove) credits; returns the new balance.

        Crediting an unlimited key gives it a balance of `amount` (it becomes metered); a
        negative amount on an unlimited key, or one taking a balance below 0, is refused
        with ValueError. `set_unlimited` undoes metering.
        """
        with self._lock, _Tx(self._db):
            r = self._db.execute("SELECT balance FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if r is None:
                raise KeyNotFound(key_id)
            balance = r["balance"]
            if balance is None:
                if amount < 0:
                    raise ValueError(f"{key_id} has unlimited credits; a negative adjustment needs a balance")
                new = amount
            else:
                new = balance + amount
                if new < 0:
                    raise ValueError(f"{key_id} has {balance} credits; removing {-amount} would go below 0")
            self._db.execute("UPDATE api_keys SET balance = ? WHERE id = ?", (new, key_id))
        return new

    def set_unlimited(self, key_id: str) -> None:
        """Stop metering a key: no balance, no reservations checked."""
        with self._lock, _Tx(self._db):
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
        with self._lock, _Tx(self._db):
            r = self._db.execute("SELECT revoked_at FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if r is None:
                raise KeyNotFound(key_id)
            if r["revoked_at"] is not None:
                raise AuthError("KEY_REVOKED", f"API key {key_id} was revoked; it cannot mint tokens")
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
        with self._lock, _Tx(self._db):
            r = self._db.execute(
                "SELECT t.key_id, t.expires_at, t.used_at, k.revoked_at FROM temp_tokens t "
                "LEFT JOIN api_keys k ON k.id = t.key_id WHERE t.token_hash = ?", (hash_secret(token),)).fetchone()
            if r is None:
                raise AuthError("INVALID_CREDENTIALS", "unknown temporary token (mint one with POST /v1/tokens)")
            if r["used_at"] is not None:
                raise AuthError("TOKEN_REUSED", "this temporary token was already used (or another connection is "
                                                "opening a session with it); a temporary token opens one "
                                                "session only, mint a new one")
            if r["expires_at"] <= now:
                raise AuthError("TOKEN_EXPIRED", "this temporary token has expired; mint a new one")
            if r["revoked_at"] is not None:
                raise AuthError("KEY_REVOKED", f"the API key that minted this token ({r['key_id']}) was revoked")
            if spend:
                self._db.execute("UPDATE temp_tokens SET used_at = ? WHERE token_hash = ?", (now, hash_secret(token)))
        return r["key_id"]

    def release_temp_token(self, token_hash: str) -> None:
        """Give back a token that an ingest route claimed (spent) but that opened no session: its
        `start` or offer was refused, or the client left before sending one. Only the claimer
        calls this (a concurrent use was refused as reused), so the token is usable again until
        it expires."""
        with self._lock, _Tx(self._db):
            self._db.execute("UPDATE temp_tokens SET used_at = NULL WHERE token_hash = ?", (token_hash,))

    # -- credits -------------------------------------------------------------------------------

    def reserve(self, owner: str, job_id: str, credits: int) -> None:
        """Hold `credits` (the session's maximum cost) against a metered key before any audio.

        Raises InsufficientCredits when balance minus open reservations is short. Unlimited
        keys, JWT owners and unknown owners are not metered: nothing is recorded."""
        if credits < 0:
            raise ValueError(f"credits must be >= 0, got {credits}")
        with self._lock, _Tx(self._db):
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
        with self._lock, _Tx(self._db):
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


# --------------------------------------------------------------------------- authenticator


def _load_rsa_public_key(path: str) -> rsa.RSAPublicKey:
    """The RS256 verification key; a clear ValueError when the file is missing or not one."""
    where = f"auth.jwt_rs256_public_key ({path})"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{where}: cannot read the file: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: not a PEM public key (expected '-----BEGIN PUBLIC KEY-----'): {e}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"{where}: RS256 needs an RSA public key, this is {type(key).__name__}")  # noqa: TRY004
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"{where}: the RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required")
    return key


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, cred = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not cred.strip():
        raise AuthError("INVALID_CREDENTIALS", "the Authorization header must be 'Bearer <API key or token>'")
    return cred.strip()


def _plausible(cred: str, source: str) -> str:
    """Refuse what no key, token or JWT can be before anything parses or hashes it: non-ASCII or
    unprintable characters (a header byte aiohttp decoded as a surrogate cannot even be hashed)
    and implausible lengths."""
    if len(cred) > MAX_CREDENTIAL_CHARS:
        raise AuthError("INVALID_CREDENTIALS", f"the credential in the {source} is over {MAX_CREDENTIAL_CHARS} characters")
    if not (cred.isascii() and cred.isprintable()):
        raise AuthError("INVALID_CREDENTIALS", f"the credential in the {source} is not printable ASCII")
    return cred


class Authenticator:
    """Turns a request's credential into a Principal, or raises AuthError (401).

    Looks at `Authorization: Bearer X`, else `?api_key=`, else `?token=`, and decides by the
    value's shape: three dot-separated parts is a JWT, `cbt_` a temporary token, anything
    else an API key. JWT algorithms are pinned per key: HS256 verifies only with the shared
    secret and RS256 only with the public key, so `alg: none` and RS256/HS256 confusion
    (a public key used as an HMAC secret) can never verify.
    """

    def __init__(self, keys: KeyStore, config: AuthConfig) -> None:
        """Raises ValueError for unusable JWT keys."""
        self.keys = keys
        self._audience: str | None = config.jwt_audience or None
        self._issuer: str | None = config.jwt_issuer or None
        self._leeway = float(config.jwt_leeway_s)
        self._jwt_keys: dict[str, Any] = {}
        if config.jwt_hs256_secret:
            secret = config.jwt_hs256_secret.encode("utf-8")
            if len(secret) < MIN_HS256_SECRET_BYTES:
                raise ValueError(f"auth.jwt_hs256_secret is {len(secret)} bytes; HS256 needs at least "
                                 f"{MIN_HS256_SECRET_BYTES} (RFC 7518 3.2), e.g. `openssl rand -hex 32`")
            self._jwt_keys["HS256"] = secret
        if config.jwt_rs256_public_key:
            self._jwt_keys["RS256"] = _load_rsa_public_key(config.jwt_rs256_public_key)
        self.backoff = AuthBackoff(config)  # consulted by the HTTP layer, on the event loop

    @property
    def jwt_algorithms(self) -> tuple[str, ...]:
        return tuple(self._jwt_keys)

    def authenticate(self, request: Any, *, allow_temp: bool = True, spend_temp: bool = True) -> Principal:
        """The caller of `request` (an aiohttp Request; only headers and query are read).

        `allow_temp=False` refuses temporary tokens without spending them: they are for
        opening ingest sessions, and any other call (or a retry of one) would otherwise burn them.
        `spend_temp=False` checks a temporary token without spending it."""
        cred, source = self._credential(request)
        if JWT_SHAPE.match(cred):
            return self._jwt(cred, source)
        if cred.startswith(TEMP_PREFIX):
            if not allow_temp:
                raise AuthError("TEMP_TOKEN_NOT_ALLOWED", "temporary tokens only open an ingest session "
                                "(GET /v1/transcription/stream, POST /v1/webrtc/offer); use an API key or a JWT here")
            key_id = self.keys.consume_temp_token(cred, spend=spend_temp)
            return Principal(owner=key_id, kind="temp_token", key_id=key_id, token_hash=hash_secret(cred))
        key = self.keys.verify_key(cred)
        if key is None:
            raise AuthError("INVALID_CREDENTIALS", f"the API key in the {source} is not valid")
        if key.revoked:
            raise AuthError("KEY_REVOKED", f"API key {key.id} was revoked")
        return Principal(owner=key.id, kind="api_key", key_id=key.id)

    @staticmethod
    def _credential(request: Any) -> tuple[str, str]:
        cred = _bearer(request.headers)
        if cred is not None:
            return _plausible(cred, "Authorization header"), "Authorization header"
        for param in ("api_key", "token"):
            value = request.query.get(param)
            if value is not None:
                if not value.strip():
                    raise AuthError("UNAUTHORIZED", f"the {param} parameter is empty")
                return _plausible(value.strip(), f"{param} parameter"), f"{param} parameter"
        raise AuthError("UNAUTHORIZED", "no credentials: send 'Authorization: Bearer <API key or token>', "
                                        "or ?api_key=KEY or ?token=TOKEN")

    def _jwt(self, token: str, source: str) -> Principal:
        # PyJWT refuses odd `kid`/`crit`/`b64` values with InvalidTokenError (not DecodeError), and
        # its json.loads raises RecursionError on a deeply nested header: every one is a 401.
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthError("INVALID_CREDENTIALS", f"the JWT in the {source} is malformed "
                                                   "(its header is not base64url JSON)") from None
        except jwt.InvalidTokenError as e:
            raise AuthError("INVALID_CREDENTIALS", f"the JWT header is refused: {str(e)[:120]}") from None
        except (RecursionError, ValueError, TypeError):
            raise AuthError("INVALID_CREDENTIALS", f"the JWT in the {source} is malformed "
                                                   "(its header is not a plain JSON object)") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in JWT_ALGORITHMS:
            raise AuthError("INVALID_CREDENTIALS", f"JWT algorithm {repr(alg)[:40]} is not accepted; "
                                                   "only HS256 and RS256 are")
        key = self._jwt_keys.get(alg)
        if key is None:
            setting = "auth.jwt_hs256_secret" if alg == "HS256" else "auth.jwt_rs256_public_key"
            raise AuthError("INVALID_CREDENTIALS", f"this server does not accept {alg} JWTs ({setting} is not set)")
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=self._audience, issuer=self._issuer, leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None})
        except jwt.ExpiredSignatureError:
            raise AuthError("TOKEN_EXPIRED", "the JWT has expired (exp is in the past)") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("INVALID_CREDENTIALS", "the JWT is not valid yet (nbf or iat is in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthError("INVALID_CREDENTIALS", f"the JWT audience (aud) must be {self._audience!r}") from None
        except jwt.InvalidIssuerError:
            raise AuthError("INVALID_CREDENTIALS", f"the JWT issuer (iss) must be {self._issuer!r}") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError("INVALID_CREDENTIALS", f"the JWT lacks the required {e.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("INVALID_CREDENTIALS", f"the JWT signature does not verify with the {alg} key") from None
        except jwt.InvalidTokenError as e:
            raise AuthError("INVALID_CREDENTIALS", f"the JWT is invalid: {str(e)[:120]}") from None
        except (RecursionError, ValueError, TypeError):  # a payload PyJWT's json.loads cannot take
            raise AuthError("INVALID_CREDENTIALS", "the JWT is malformed (its claims are not a plain JSON object)") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.strip():
            raise AuthError("INVALID_CREDENTIALS", "the JWT 'sub' claim must be a non-empty string")
        return Principal(owner=f"jwt:{sub}", kind="jwt", subject=sub)


def bootstrap_key(keys: KeyStore, data_dir: str) -> str | None:
    """First start with no usable key: create one named "default" and write it to
    `<data_dir>/api_key` (mode 0600, readable by the service user only). Returns the secret
    for the caller to print once, or None when an active key exists."""
    if keys.active_key_count() > 0:
        return None
    _key, secret = keys.create_key(name="default")
    path = Path(data_dir) / KEY_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        os.write(fd, (secret + "\n").encode())
    finally:
        os.close(fd)
    return secret
