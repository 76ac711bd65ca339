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

Keys, tokens and credit reservations are persisted by the key store (bridge.stores.KeyStore);
this module decides who a request is. `Authenticator` turns a request into a `Principal` or
raises `AuthError` (HTTP 401, JSON body), before any WebSocket upgrade.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.backoff import AuthBackoff
from bridge.config import AuthConfig
from bridge.keyformat import JWT_SHAPE, MIN_CONFIG_KEY_CHARS, TEMP_PREFIX, config_key_problem
# the key store's vocabulary; also re-exported here, where callers have always found it
from bridge.stores.keys import (
    KEY_PREFIX,
    ApiKey,
    InsufficientCredits,
    KeyNotFound,
    KeyStore,
    TokenRefused,
    hash_secret,
    key_id_for,
)

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
    "Principal",
    "bootstrap_key",
    "config_key_problem",
    "hash_secret",
    "key_id_for",
]

KEY_FILE_NAME = "api_key"  # the generated key, in the data dir
MIN_HS256_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key MUST be at least 256 bits
MIN_RSA_BITS = 2048
MAX_CREDENTIAL_CHARS = 8192  # far above any key, token or JWT of ours; keeps hashing and parsing bounded
JWT_ALGORITHMS = ("HS256", "RS256")

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

    async def authenticate(self, request: Any, *, allow_temp: bool = True, spend_temp: bool = True) -> Principal:
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
            try:
                key_id = await self.keys.consume_temp_token(cred, spend=spend_temp)
            except TokenRefused as e:
                raise AuthError(e.code, e.message) from None
            return Principal(owner=key_id, kind="temp_token", key_id=key_id, token_hash=hash_secret(cred))
        key = await self.keys.verify_key(cred)
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


async def bootstrap_key(keys: KeyStore, data_dir: str) -> str | None:
    """First start with no usable key: create one named "default" and write it to
    `<data_dir>/api_key` (mode 0600, readable by the service user only). Returns the secret
    for the caller to print once, or None when an active key exists."""
    if await keys.active_key_count() > 0:
        return None
    _key, secret = await keys.create_key(name="default")
    path = Path(data_dir) / KEY_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        os.write(fd, (secret + "\n").encode())
    finally:
        os.close(fd)
    return secret
