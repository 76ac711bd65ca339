"""Authentication: the key store (hashing, revocation, temporary tokens, credits), the
Authenticator's JWT rules, `POST /v1/tokens`, `callbridge keys`, and the auth matrix over a real
socket: every refused credential gets 401 with a JSON body before the WebSocket upgrade, every
valid one opens a stream whose job belongs to the right owner.

What goes through the key store runs on each storage backend (the `storage` fixture of
tests/conftest.py: SQLite and a real PostgreSQL): the store tests through `keys`, the service
tests through `server` and `jwt_server`. What reads SQLite's file (nothing but hashes on disk) or
its threads stays on SQLite, and the JWT rules and the backoff, which never reach the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bench.drive import wait_for
from bridge.auth import Authenticator, AuthError, Principal, bootstrap_key, key_id_for
from bridge.backoff import source_of
from bridge.config import AuthConfig
from bridge.stores import InsufficientCredits, KeyNotFound, KeyStore, TokenRefused, open_stores
from bridge.stores.sqlite.keys import SqliteKeyStore
from bridge.stores.sqlite.threaded import ThreadedKeyStore
from tests.serving import API_KEY, OTHER_KEY, start_server

HS_SECRET = "hs256-test-secret-0123456789abcdef0123456789"  # >= 32 bytes, as RFC 7518 requires
AUD = "callbridge"


class Clock:
    """A settable clock for the KeyStore, so expiry is tested without sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock):
    """The blocking SQLite store, for what only SQLite has (its file, its threads)."""
    s = SqliteKeyStore(str(tmp_path / "callbridge.db"), clock=clock)
    yield s
    s.close()


@pytest.fixture
async def keys(storage: dict[str, str], tmp_path: Path, clock: Clock):
    """The service's KeyStore on each backend, with the settable clock."""
    stores = await open_stores(storage.get("storage.url") or f"sqlite://{tmp_path / 'callbridge.db'}")
    stores.keys.clock = clock
    yield stores.keys
    await stores.close()


@pytest.fixture
async def server(tmp_path: Path, pool: Any, storage: dict[str, str]):
    """The real service (tests/conftest.py's), on each storage backend."""
    srv = await start_server(tmp_path / "data", pool, **storage)
    yield srv
    await srv.stop()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def rsa_pem_path(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> str:
    path = tmp_path / "jwt-public.pem"
    path.write_bytes(_public_pem(rsa_key))
    return str(path)


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "alice", "aud": AUD, "iat": now, "exp": now + 300}
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def hs256(**over: Any) -> str:
    return jwt.encode(_claims(**over), HS_SECRET, algorithm="HS256")


def rs256(key: rsa.RSAPrivateKey, **over: Any) -> str:
    return jwt.encode(_claims(**over), key, algorithm="RS256")


def _forge_hs256(secret: bytes) -> str:
    b64 = lambda obj: jwt.utils.base64url_encode(json.dumps(obj).encode()).decode()
    signing_input = b64({"alg": "HS256", "typ": "JWT"}) + "." + b64(_claims())
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + jwt.utils.base64url_encode(sig).decode()


def _request(headers: dict[str, str] | None = None, **query: str) -> Any:
    """Authenticator only reads `headers` and `query` of the aiohttp request."""
    return SimpleNamespace(headers=headers or {}, query=query)


# --------------------------------------------------------------------------- KeyStore: keys


def test_secret_is_stored_only_as_hash(tmp_path: Path, store: SqliteKeyStore) -> None:
    key, secret = store.create_key(name="ci", credits=10)
    assert secret.startswith("cbk_") and len(secret) >= 40
    assert key.id == "key_" + hashlib.sha256(secret.encode()).hexdigest()[:16] == key_id_for(secret)
    assert key.prefix == secret[:8] and key.balance == 10 and key.name == "ci"
    store.ensure_keys([API_KEY])
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("callbridge.db"))
    assert secret.encode() not in raw and API_KEY.encode() not in raw
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in raw  # what is kept instead

    reopened = SqliteKeyStore(str(tmp_path / "callbridge.db"))
    try:
        assert reopened.verify_key(secret) == key
        assert reopened.verify_key(secret + "x") is None
        assert reopened.verify_key("") is None
    finally:
        reopened.close()


async def test_config_keys_are_imported_idempotently_with_stable_ids(keys: KeyStore) -> None:
    await keys.ensure_keys([API_KEY, OTHER_KEY])
    await keys.ensure_keys([API_KEY])
    listed = {k.id: k for k in await keys.list_keys()}
    assert set(listed) == {key_id_for(API_KEY), key_id_for(OTHER_KEY)}
    assert all(k.name == "config" and k.balance is None and not k.revoked for k in listed.values())
    assert await keys.active_key_count() == 2
    # revocation wins over config: importing the key again does not bring it back
    assert await keys.revoke(key_id_for(API_KEY))
    await keys.ensure_keys([API_KEY, OTHER_KEY])
    assert (await keys.get_key(key_id_for(API_KEY))).revoked
    assert await keys.active_key_count() == 1


@pytest.mark.parametrize("bad, why", [("short", "at least 16"), ("cbt_looks_like_a_temp_token", "cbt_"),
                                      ("aaaaaaaa.bbbbbbbb.cccccccc", "JWT")])
async def test_config_keys_that_could_never_authenticate_are_refused(keys: KeyStore, bad: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        await keys.ensure_keys([bad])
    assert await keys.list_keys() == []


async def test_revoke(keys: KeyStore) -> None:
    key, secret = await keys.create_key()
    assert await keys.revoke(key.id) is True
    assert await keys.revoke(key.id) is False  # already revoked
    assert await keys.revoke("key_doesnotexist00") is False
    found = await keys.verify_key(secret)
    assert found is not None and found.revoked and found.revoked_at == keys.clock()
    assert await keys.active_key_count() == 0


async def test_credits_adjustments(keys: KeyStore) -> None:
    key, _ = await keys.create_key()
    assert (await keys.get_key(key.id)).balance is None  # unlimited by default
    with pytest.raises(ValueError, match="unlimited"):
        await keys.add_credits(key.id, -5)
    assert await keys.add_credits(key.id, 100) == 100  # crediting an unlimited key meters it
    assert await keys.add_credits(key.id, -30) == 70
    with pytest.raises(ValueError, match="below 0"):
        await keys.add_credits(key.id, -71)
    assert (await keys.get_key(key.id)).balance == 70
    await keys.set_unlimited(key.id)
    assert (await keys.get_key(key.id)).balance is None
    with pytest.raises(KeyNotFound):
        await keys.add_credits("key_nope", 1)
    with pytest.raises(KeyNotFound):
        await keys.set_unlimited("key_nope")


# --------------------------------------------------------------------------- KeyStore: temporary tokens


async def test_temp_token_is_single_use(keys: KeyStore, clock: Clock) -> None:
    key, _ = await keys.create_key()
    token, expires_at = await keys.mint_temp_token(key.id, 60)
    assert token.startswith("cbt_") and expires_at == clock.now + 60
    assert await keys.consume_temp_token(token) == key.id
    with pytest.raises(TokenRefused) as e:
        await keys.consume_temp_token(token)
    assert e.value.code == "TOKEN_REUSED" and token not in e.value.message


async def test_temp_token_expires(keys: KeyStore, clock: Clock) -> None:
    key, _ = await keys.create_key()
    token, _ = await keys.mint_temp_token(key.id, 60)
    clock.now += 60.5
    with pytest.raises(TokenRefused) as e:
        await keys.consume_temp_token(token)
    assert e.value.code == "TOKEN_EXPIRED"
    fresh, _ = await keys.mint_temp_token(key.id, 60)
    clock.now += 59
    assert await keys.consume_temp_token(fresh) == key.id  # just inside its lifetime


async def test_temp_token_refused_when_unknown_or_key_revoked(keys: KeyStore) -> None:
    key, _ = await keys.create_key()
    token, _ = await keys.mint_temp_token(key.id, 60)
    with pytest.raises(TokenRefused) as e:
        await keys.consume_temp_token("cbt_" + "x" * 43)
    assert e.value.code == "INVALID_CREDENTIALS"
    await keys.revoke(key.id)
    with pytest.raises(TokenRefused) as e:
        await keys.consume_temp_token(token)
    assert e.value.code == "KEY_REVOKED"
    with pytest.raises(TokenRefused) as e:
        await keys.mint_temp_token(key.id, 60)
    assert e.value.code == "KEY_REVOKED"
    with pytest.raises(KeyNotFound):
        await keys.mint_temp_token("key_nope", 60)


def test_temp_token_consumed_once_under_concurrency(tmp_path: Path, store: SqliteKeyStore) -> None:
    """Threads on one connection and a second connection (another process) race for one token."""
    key, _ = store.create_key()
    token, _ = store.mint_temp_token(key.id, 60)
    other = SqliteKeyStore(str(tmp_path / "callbridge.db"), clock=store.clock)

    def attempt(i: int) -> str:
        try:
            (store if i % 2 else other).consume_temp_token(token)
            return "ok"
        except TokenRefused as e:
            return e.code

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(attempt, range(16)))
    finally:
        other.close()
    assert results.count("ok") == 1 and results.count("TOKEN_REUSED") == 15


def test_temp_token_stored_only_as_hash(tmp_path: Path, store: SqliteKeyStore) -> None:
    key, _ = store.create_key()
    token, _ = store.mint_temp_token(key.id, 60)
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("callbridge.db"))
    assert token.encode() not in raw


# --------------------------------------------------------------------------- KeyStore: reservations


async def test_reserve_and_settle(keys: KeyStore) -> None:
    key, _ = await keys.create_key(credits=1000)
    await keys.reserve(key.id, "job_a", 600)
    with pytest.raises(InsufficientCredits) as e:
        await keys.reserve(key.id, "job_b", 600)
    assert (e.value.balance, e.value.needed) == (400, 600)  # available = balance - held
    await keys.reserve(key.id, "job_b", 400)
    k = await keys.get_key(key.id)
    assert (k.balance, k.reserved, k.available) == (1000, 1000, 0)

    await keys.settle("job_a", 100)  # the actual use is charged, not the 600 held
    k = await keys.get_key(key.id)
    assert (k.balance, k.reserved) == (900, 400)
    await keys.settle("job_a", 100)  # idempotent
    await keys.settle("job_never_reserved", 50)  # no-op
    assert (await keys.get_key(key.id)).balance == 900
    await keys.settle("job_b", 5000)  # more than the balance: floored at 0, never negative
    assert (await keys.get_key(key.id)).balance == 0 and await keys.open_reservations() == {}


async def test_unmetered_owners_reserve_nothing(keys: KeyStore) -> None:
    unlimited, _ = await keys.create_key()
    await keys.reserve(unlimited.id, "job_1", 10**9)
    await keys.reserve("jwt:alice", "job_2", 10**9)
    assert await keys.open_reservations() == {}
    await keys.settle("job_1", 10)
    assert (await keys.get_key(unlimited.id)).balance is None


def test_orphaned_reservations_are_settled_at_startup(tmp_path: Path, store: SqliteKeyStore) -> None:
    key, _ = store.create_key(credits=1000)
    store.reserve(key.id, "job_crashed", 500)
    store.reserve(key.id, "job_empty", 300)
    store.close()  # the process dies with both sessions live

    reopened = SqliteKeyStore(str(tmp_path / "callbridge.db"))
    try:
        used = {"job_crashed": 42, "job_empty": 0}
        assert reopened.settle_orphans(used.__getitem__) == 2
        k = reopened.get_key(key.id)
        assert (k.balance, k.reserved) == (958, 0)
        assert reopened.settle_orphans(used.__getitem__) == 0
    finally:
        reopened.close()


async def test_bootstrap_key(tmp_path: Path, keys: KeyStore) -> None:
    data_dir = tmp_path / "data"
    secret = await bootstrap_key(keys, str(data_dir))
    assert secret is not None
    path = data_dir / "api_key"
    assert path.read_text().strip() == secret
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = await keys.verify_key(secret)
    assert key is not None and key.name == "default" and key.balance is None
    assert await bootstrap_key(keys, str(data_dir)) is None  # an active key exists now


# --------------------------------------------------------------------------- Authenticator


def _auth(store: SqliteKeyStore | KeyStore, **config: Any) -> Authenticator:
    """Over the blocking SQLite store (the JWT rules, which never reach it) or any KeyStore."""
    return Authenticator(ThreadedKeyStore(store) if isinstance(store, SqliteKeyStore) else store, AuthConfig(**config))


async def _refused(auth: Authenticator, request: Any, code: str, **kw: Any) -> AuthError:
    with pytest.raises(AuthError) as e:
        await auth.authenticate(request, **kw)
    assert e.value.code == code, e.value.message
    assert e.value.status == 401 and e.value.to_dict() == {"error": {"code": code, "message": e.value.message}}
    return e.value


def test_construction_refuses_unusable_jwt_keys(tmp_path: Path, store: SqliteKeyStore) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        _auth(store, jwt_rs256_public_key=str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ValueError, match="not a PEM public key"):
        _auth(store, jwt_rs256_public_key=str(tmp_path / "junk.pem"))
    (tmp_path / "ec.pem").write_bytes(_public_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ValueError, match="RSA public key"):
        _auth(store, jwt_rs256_public_key=str(tmp_path / "ec.pem"))
    with pytest.raises(ValueError, match="at least 32"):
        _auth(store, jwt_hs256_secret="too-short")


async def test_credential_sources_and_kinds(keys: KeyStore) -> None:
    await keys.ensure_keys([API_KEY, OTHER_KEY])
    auth = _auth(keys, jwt_hs256_secret=HS_SECRET)
    api = Principal(owner=key_id_for(API_KEY), kind="api_key", key_id=key_id_for(API_KEY))
    assert await auth.authenticate(_request(api_key=API_KEY)) == api
    assert await auth.authenticate(_request({"Authorization": f"Bearer {API_KEY}"})) == api
    # the header wins over the query
    assert await auth.authenticate(_request({"Authorization": f"bearer {API_KEY}"}, api_key=OTHER_KEY)) == api
    assert await auth.authenticate(_request(token=hs256())) == Principal(owner="jwt:alice", kind="jwt", subject="alice")
    await _refused(auth, _request(), "UNAUTHORIZED")
    await _refused(auth, _request(api_key=""), "UNAUTHORIZED")
    await _refused(auth, _request({"Authorization": f"Basic {API_KEY}"}), "INVALID_CREDENTIALS")
    err = await _refused(auth, _request(api_key="cbk_wrong_but_plausible_key_value_0000"), "INVALID_CREDENTIALS")
    assert "cbk_wrong" not in err.message


async def test_temp_token_not_spent_where_not_allowed(keys: KeyStore) -> None:
    key, _ = await keys.create_key()
    token, _ = await keys.mint_temp_token(key.id, 60)
    auth = _auth(keys)
    await _refused(auth, _request({"Authorization": f"Bearer {token}"}), "TEMP_TOKEN_NOT_ALLOWED", allow_temp=False)
    assert await auth.authenticate(_request(token=token)) == Principal(owner=key.id, kind="temp_token", key_id=key.id)
    await _refused(auth, _request(token=token), "TOKEN_REUSED")


async def test_jwt_rules(store: SqliteKeyStore, rsa_key: rsa.RSAPrivateKey, rsa_pem_path: str) -> None:
    auth = _auth(store, jwt_hs256_secret=HS_SECRET, jwt_rs256_public_key=rsa_pem_path, jwt_leeway_s=0)
    now = int(time.time())
    assert (await auth.authenticate(_request(token=rs256(rsa_key, sub="bob")))).owner == "jwt:bob"
    cases = {
        "expired": (hs256(exp=now - 10), "TOKEN_EXPIRED"),
        "not yet valid": (hs256(nbf=now + 600), "INVALID_CREDENTIALS"),
        "wrong audience": (hs256(aud="someone-else"), "INVALID_CREDENTIALS"),
        "no audience": (hs256(aud=None), "INVALID_CREDENTIALS"),
        "no exp": (hs256(exp=None), "INVALID_CREDENTIALS"),
        "no sub": (hs256(sub=None), "INVALID_CREDENTIALS"),
        "bad signature": (jwt.encode(_claims(), "another-secret-of-at-least-32-bytes!!", algorithm="HS256"),
                          "INVALID_CREDENTIALS"),
        "alg none": (jwt.encode(_claims(), None, algorithm="none"), "INVALID_CREDENTIALS"),
        "HS512": (jwt.encode(_claims(), HS_SECRET + HS_SECRET, algorithm="HS512"), "INVALID_CREDENTIALS"),
        "garbage jwt": ("aaaa.bbbb.cccc", "INVALID_CREDENTIALS"),
    }
    for name, (token, code) in cases.items():
        err = await _refused(auth, _request(token=token), code)
        assert token not in err.message, name
    # algorithm confusion: an HS256 token whose HMAC secret is the RS256 *public* key (which
    # PyJWT will not even sign with, hence forged by hand)
    await _refused(auth, _request(token=_forge_hs256(Path(rsa_pem_path).read_bytes())), "INVALID_CREDENTIALS")
    await _refused(_auth(store, jwt_rs256_public_key=rsa_pem_path), _request(token=hs256()), "INVALID_CREDENTIALS")


async def test_jwt_issuer_checked_when_configured(store: SqliteKeyStore) -> None:
    auth = _auth(store, jwt_hs256_secret=HS_SECRET, jwt_issuer="https://idp.example")
    assert (await auth.authenticate(_request(token=hs256(iss="https://idp.example")))).subject == "alice"
    await _refused(auth, _request(token=hs256(iss="https://evil.example")), "INVALID_CREDENTIALS")
    await _refused(auth, _request(token=hs256()), "INVALID_CREDENTIALS")


# --------------------------------------------------------------------------- over a real socket


@pytest.fixture
async def jwt_server(tmp_path: Path, pool: Any, rsa_pem_path: str, storage: dict[str, str]):
    """The real service with API keys, HS256 and RS256 all accepted; no authentication backoff
    (the matrix sends dozens of refused credentials on purpose; the backoff is tested below)."""
    srv = await start_server(tmp_path / "data", pool, **{"auth.jwt_hs256_secret": HS_SECRET,
                                                         "auth.jwt_rs256_public_key": rsa_pem_path,
                                                         "auth.failures_before_backoff": "0", **storage})
    yield srv
    await srv.stop()


async def _mint(session: aiohttp.ClientSession, srv: Any, key: str = API_KEY, **body: Any) -> str:
    async with session.post(f"{srv.url}/v1/tokens", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 201, await r.text()
        return (await r.json())["token"]


async def _stream_owner(session: aiohttp.ClientSession, srv: Any, query: dict[str, str] | None = None,
                        headers: dict[str, str] | None = None) -> str:
    """Open a stream, expect `ready` then `completed`; returns the owner of the job it created."""
    async with session.ws_connect(srv.ws_url, params=query, headers=headers) as ws:
        await ws.send_json({"type": "start"})
        ready = await ws.receive_json(timeout=15)
        assert ready["type"] == "ready", ready
        await ws.send_json({"type": "end"})
        frames = [json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]
    assert frames and frames[-1]["type"] == "completed", frames
    job = await srv.service.store.get_job(ready["job_id"])
    assert job is not None
    return job.owner


async def _expect_401(session: aiohttp.ClientSession, srv: Any, code: str, query: dict[str, str] | None = None,
                      headers: dict[str, str] | None = None, secret: str | None = None) -> None:
    """Refused before the upgrade: the handshake fails with 401, and the same request as a plain
    GET shows the JSON body. Nothing is created."""
    jobs_before = len((await srv.service.store.list_jobs(limit=100))[0])
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        async with session.ws_connect(srv.ws_url, params=query, headers=headers):
            pass
    assert e.value.status == 401
    async with session.get(srv.ws_url.replace("ws://", "http://"), params=query, headers=headers) as r:
        assert r.status == 401 and r.content_type == "application/json"
        body = await r.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"] and (secret is None or secret not in body["error"]["message"])
    assert len((await srv.service.store.list_jobs(limit=100))[0]) == jobs_before


async def test_auth_matrix_refusals(jwt_server: Any, rsa_key: rsa.RSAPrivateKey) -> None:
    srv = jwt_server
    now = int(time.time())
    revoked, revoked_secret = await srv.service.keys.create_key(name="gone")
    await srv.service.keys.revoke(revoked.id)
    async with aiohttp.ClientSession() as s:
        await _expect_401(s, srv, "UNAUTHORIZED")
        await _expect_401(s, srv, "INVALID_CREDENTIALS", {"api_key": "cbk_not_a_real_key_000000"},
                          secret="cbk_not_a_real_key")
        await _expect_401(s, srv, "INVALID_CREDENTIALS", headers={"Authorization": "Bearer cbk_bogus_bogus_bogus"},
                          secret="cbk_bogus")
        await _expect_401(s, srv, "KEY_REVOKED", {"api_key": revoked_secret}, secret=revoked_secret)
        for code, token in [("TOKEN_EXPIRED", hs256(exp=now - 120)),
                            ("TOKEN_EXPIRED", rs256(rsa_key, exp=now - 120)),
                            ("INVALID_CREDENTIALS", hs256(aud="other-service")),
                            ("INVALID_CREDENTIALS", rs256(rsa_key, sub=None)),
                            ("INVALID_CREDENTIALS", jwt.encode(_claims(), None, algorithm="none"))]:
            await _expect_401(s, srv, code, {"token": token}, secret=token)

        # a temporary token opens one stream; the second attempt is refused as reused
        token = await _mint(s, srv)
        assert await _stream_owner(s, srv, {"token": token}) == key_id_for(API_KEY)
        await _expect_401(s, srv, "TOKEN_REUSED", {"token": token}, secret=token)

        # an unused one past its lifetime is refused as expired (the store's clock moved on)
        token = await _mint(s, srv, expires_in=60)
        srv.service.keys.clock = lambda: time.time() + 61
        await _expect_401(s, srv, "TOKEN_EXPIRED", {"token": token}, secret=token)


async def test_auth_matrix_accepted(jwt_server: Any, rsa_key: rsa.RSAPrivateKey) -> None:
    srv = jwt_server
    async with aiohttp.ClientSession() as s:
        assert await _stream_owner(s, srv, {"api_key": API_KEY}) == key_id_for(API_KEY)
        assert await _stream_owner(s, srv, headers={"Authorization": f"Bearer {OTHER_KEY}"}) == key_id_for(OTHER_KEY)
        assert await _stream_owner(s, srv, {"token": hs256(sub="hs-user")}) == "jwt:hs-user"
        assert await _stream_owner(s, srv, headers={"Authorization": f"Bearer {rs256(rsa_key, sub='rs-user')}"}) \
            == "jwt:rs-user"
        # a temporary token acts as the key that minted it
        token = await _mint(s, srv, key=OTHER_KEY, expires_in=120)
        assert await _stream_owner(s, srv, {"token": token}) == key_id_for(OTHER_KEY)


async def test_post_tokens(server: Any) -> None:
    url = f"{server.url}/v1/tokens"
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, headers=bearer) as r:  # empty body: the default lifetime
            assert r.status == 201 and r.headers["Cache-Control"] == "no-store"
            body = await r.json()
        assert body["token"].startswith("cbt_") and body["expires_in"] == 60
        assert abs(body["expires_at"] - (time.time() + 60)) < 5

        async with s.post(url, params={"api_key": API_KEY}, json={"expires_in": 360000}) as r:
            assert r.status == 201
            assert (await r.json())["expires_in"] == 360000

        for bad in ({"expires_in": 59}, {"expires_in": 360001}, {"expires_in": "600"}, {"expires_in": 60.5},
                    {"expires_in": True}, [60]):
            async with s.post(url, headers=bearer, json=bad) as r:
                assert r.status == 400, bad
                assert (await r.json())["error"]["code"] == "INVALID_REQUEST"
        async with s.post(url, headers=bearer, data=b"{not json") as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "INVALID_REQUEST"

        async with s.post(url, json={"expires_in": 60}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "UNAUTHORIZED"


async def test_temp_tokens_cannot_mint_or_call_rest(server: Any) -> None:
    async with aiohttp.ClientSession() as s:
        token = await _mint(s, server)
        temp = {"Authorization": f"Bearer {token}"}
        async with s.post(f"{server.url}/v1/tokens", headers=temp) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "TEMP_TOKEN_NOT_ALLOWED"
        async with s.get(f"{server.url}/v1/jobs", params={"token": token}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "TEMP_TOKEN_NOT_ALLOWED"
        # being refused there did not spend it
        assert await _stream_owner(s, server, {"token": token}) == key_id_for(API_KEY)


async def test_jwt_callers_cannot_mint(jwt_server: Any) -> None:
    headers = {"Authorization": f"Bearer {hs256()}"}
    async with aiohttp.ClientSession() as s, s.post(f"{jwt_server.url}/v1/tokens", headers=headers) as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "FORBIDDEN"


async def test_credits_reserved_at_start_and_settled_to_use(server: Any) -> None:
    """A short balance is refused before any audio; a session that fits holds its maximum cost
    while live and is charged only what it streamed."""
    keys = server.service.keys
    key, secret = await keys.create_key(name="metered", credits=100)
    jobs_before = len((await server.service.store.list_jobs(limit=100))[0])
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(server.ws_url, params={"api_key": secret}) as ws:
            await ws.send_json({"type": "start"})  # 3 h at 220 credits/min: 39600 held, 100 available
            err = await ws.receive_json(timeout=15)
        assert err["type"] == "error" and err["code"] == "INSUFFICIENT_CREDITS", err
        assert len((await server.service.store.list_jobs(limit=100))[0]) == jobs_before
        assert (await keys.get_key(key.id)).reserved == 0

        async with s.ws_connect(server.ws_url, params={"api_key": secret}) as ws:
            await ws.send_json({"type": "start", "max_duration_seconds": 20})  # ceil(20 s x 220 / 60) = 74
            assert (await ws.receive_json(timeout=15))["type"] == "ready"
            assert ((await keys.get_key(key.id)).balance, (await keys.get_key(key.id)).reserved) == (100, 74)
            await ws.send_bytes(b"\x00\x00" * 16000)  # 1 s of silence: 220 / 60 = 3.67 credits
            await ws.send_json({"type": "end"})
            frames = [json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]
    assert frames[-1]["type"] == "completed" and frames[-1]["credits_used"] == pytest.approx(3.67, abs=0.01)
    k = await keys.get_key(key.id)
    assert (k.balance, k.reserved) == (96, 0)  # charged ceil(3.67) = 4, not the 74 held


async def test_serve_bootstraps_a_key_once(tmp_path: Path, pool: Any, storage: dict[str, str]) -> None:
    """With no key configured the service creates one, stores it in the data dir, and it works."""
    srv = await start_server(tmp_path / "data", pool, **{"server.api_keys": "", **storage})
    try:
        secret = srv.service.generated_key
        assert secret is not None and (tmp_path / "data" / "api_key").read_text().strip() == secret
        async with aiohttp.ClientSession() as s:
            await _mint(s, srv, key=secret)
    finally:
        await srv.stop()
    again = await start_server(tmp_path / "data", pool, **{"server.api_keys": "", **storage})
    try:
        assert again.service.generated_key is None
    finally:
        await again.stop()


# --------------------------------------------------------------------------- callbridge keys


def _keys_cli(*argv: str) -> int:
    """Parse and run like `callbridge keys ...` (bridge.cli registers the same builder)."""
    from bridge.cli import _Parser
    from bridge.commands.keys import DISPATCH, add_keys_parser

    parser = _Parser(prog="callbridge")
    sub = parser.add_subparsers(dest="group", parser_class=_Parser)
    add_keys_parser(sub)
    ns = parser.parse_args(["keys", *argv])
    return DISPATCH[ns.command](ns)


def test_keys_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str], storage: dict[str, str],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.cli import UsageError

    data = str(tmp_path / "data")
    url = storage.get("storage.url") or f"sqlite://{Path(data) / 'callbridge.db'}"
    if storage:  # the commands read storage.url from the environment, as an operator's would
        monkeypatch.setenv("CALLBRIDGE_STORAGE_URL", url)
    with pytest.raises(UsageError, match="no database"):
        _keys_cli("list", "--data-dir", data)  # a wrong --data-dir is not silently a new database

    assert _keys_cli("create", "--name", "alice", "--credits", "500", "--data-dir", data) == 0
    out = capsys.readouterr().out
    secret = next(line.split()[1] for line in out.splitlines() if line.startswith("secret:"))
    key_id = key_id_for(secret)
    assert key_id in out and "shown only this once" in out

    assert _keys_cli("--data-dir", data, "credit", key_id, "-100") == 0  # flags before the subcommand too
    assert "balance 400" in capsys.readouterr().out
    with pytest.raises(UsageError, match="below 0"):
        _keys_cli("credit", key_id, "-401", "--data-dir", data)
    with pytest.raises(UsageError, match="no API key"):
        _keys_cli("revoke", "key_nope", "--data-dir", data)

    assert _keys_cli("list", "--data-dir", data) == 0
    table = capsys.readouterr().out
    assert key_id in table and "alice" in table and secret[:8] in table and secret not in table
    assert _keys_cli("revoke", key_id, "--data-dir", data) == 0
    assert _keys_cli("list", "--json", "--data-dir", data) == 0
    listed = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the revoke line
    assert listed[0]["id"] == key_id and listed[0]["balance"] == 400 and listed[0]["revoked_at"] is not None

    async def revoked() -> bool:
        stores = await open_stores(url, create=False)
        try:
            return (await stores.keys.verify_key(secret)).revoked
        finally:
            await stores.close()

    assert asyncio.run(revoked())


async def test_plain_get_of_stream_url_does_not_spend_a_temp_token(server):
    """A browser prefetch or a client's error probe (plain GET) must not burn the token."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v1/tokens", json={"expires_in": 60},
                             headers={"Authorization": f"Bearer {server.api_key}"}) as r:
            token = (await r.json())["token"]
        async with http.get(f"{server.ws_url}?token={token}") as r:
            assert r.status == 426 and (await r.json())["error"]["code"] == "UPGRADE_REQUIRED"
        async with http.ws_connect(f"{server.ws_url}?token={token}") as ws:  # still good
            await ws.send_json({"type": "start"})
            assert (await ws.receive_json())["type"] == "ready"
            await ws.send_json({"type": "end"})
        async with http.get(f"{server.ws_url}?token={token}") as r:  # now spent: 401 says why
            assert r.status == 401 and (await r.json())["error"]["code"] == "TOKEN_REUSED"


# --------------------------------------------------------------------------- temporary tokens: one ingest session


async def test_temp_token_is_refused_on_event_routes_and_not_spent(server: Any) -> None:
    """A token opens one ingest session; the live event routes (which would show every session of
    the key) refuse it with 401 whatever else is wrong with the request, and do not spend it."""
    async with aiohttp.ClientSession() as s:
        token = await _mint(s, server)
        # another session of the same key, live while the token is tried on its events
        async with s.ws_connect(server.ws_url, params={"api_key": API_KEY}) as live:
            await live.send_json({"type": "start"})
            job_id = (await live.receive_json(timeout=15))["job_id"]
            for path, extra in [("/v1/events", {}), ("/v1/events", {"types": "bogus", "source": "nope"}),
                                (f"/v1/calls/{job_id}/events", {}), (f"/v1/calls/{job_id}/events", {"after": "x"}),
                                ("/v1/calls/job_unknown/events", {})]:
                url = f"{server.url}{path}"
                async with s.get(url, params={"token": token, **extra}) as r:  # a plain GET
                    assert r.status == 401 and r.content_type == "application/json", (path, r.status)
                    assert (await r.json())["error"]["code"] == "TEMP_TOKEN_NOT_ALLOWED"
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    async with s.ws_connect(url, params=extra, headers={"Authorization": f"Bearer {token}"}):
                        pass
                assert e.value.status == 401, path
            await live.send_json({"type": "end"})
        # none of that spent it
        assert await _stream_owner(s, server, {"token": token}) == key_id_for(API_KEY)
        await _expect_401(s, server, "TOKEN_REUSED", {"token": token}, secret=token)


async def _given_back(srv: Any, token: str) -> None:
    """Wait until the stream handler has given `token` back: it does so in its `finally`, in a
    thread, after the close handshake the client already saw. The timeout only guards a hang."""
    async def claimable() -> bool:
        try:
            await srv.service.keys.consume_temp_token(token, spend=False)
        except TokenRefused as e:
            if e.code != "TOKEN_REUSED":
                raise
            return False
        return True

    assert await wait_for(claimable, timeout=60), "the stream handler never gave the token back"


async def test_ingest_refused_before_the_session_opens_does_not_spend_the_token(server: Any) -> None:
    """The stream socket claims the token at the upgrade (a concurrent use is 401 TOKEN_REUSED) and
    gives it back when no session opens: a refused `start`, a client gone before `start`. A WebRTC
    offer claims it only once the offer is valid and gives it back when the call cannot open."""
    async with aiohttp.ClientSession() as s:
        token = await _mint(s, server)
        params = {"token": token}
        async with s.ws_connect(server.ws_url, params=params) as ws:
            # while this socket holds the claim, another handshake with the token is refused
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                async with s.ws_connect(server.ws_url, params=params):
                    pass
            assert e.value.status == 401
            await ws.send_json({"type": "start", "sample_rate": "fast"})
            err = await ws.receive_json(timeout=15)
            assert err["code"] == "INVALID_CONFIG"
        await _given_back(server, token)
        async with s.ws_connect(server.ws_url, params=params) as ws:
            await ws.send_bytes(b"\x00\x00")  # audio before start: refused
            assert (await ws.receive_json(timeout=15))["code"] == "INVALID_CONFIG"
        await _given_back(server, token)
        async with s.ws_connect(server.ws_url, params=params) as ws:
            pass  # gone before start
        await _given_back(server, token)
        offer = {"type": "offer", "sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"}
        for body in ({**offer, "config": {"endpointing_ms": -1}},  # refused by validation
                     offer):  # valid JSON, refused by the WebRTC stack after the token was claimed
            async with s.post(f"{server.url}/v1/webrtc/offer", params=params, json=body) as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "INVALID_CONFIG", await r.text()
        # after all that, the token still opens its one session, and only one
        assert await _stream_owner(s, server, params) == key_id_for(API_KEY)
        await _expect_401(s, server, "TOKEN_REUSED", params, secret=token)
        async with s.post(f"{server.url}/v1/webrtc/offer", params=params, json=offer) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "TOKEN_REUSED"
    assert len((await server.service.store.list_jobs(limit=100))[0]) == 1


# --------------------------------------------------------------------------- backoff after failed authentication


async def _status(session: aiohttp.ClientSession, srv: Any, key: str | None) -> tuple[int, dict, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.get(f"{srv.url}/v1/jobs", headers=headers) as r:
        return r.status, await r.json(), r.headers


@pytest.fixture
async def backoff_server(tmp_path: Path, pool: Any):
    srv = await start_server(tmp_path / "data", pool, **{
        "auth.failures_before_backoff": "3", "auth.failure_window_s": "60",
        "auth.backoff_initial_s": "10", "auth.backoff_max_s": "25"})
    srv.service.auth.backoff.clock = Clock(1000.0)  # time moves when the test says so
    yield srv
    await srv.stop()


def _from(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from `address` (any 127.x.y.z is this machine's loopback)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), force_close=True))


async def test_failed_authentication_backs_off_per_source(backoff_server: Any) -> None:
    srv = backoff_server
    clock = srv.service.auth.backoff.clock
    wrong = "cbk_wrong_key_guess_0000000000000000"
    async with _from("127.0.0.1") as a, _from("127.0.0.2") as b, _from("127.0.0.3") as c:
        for _ in range(3):  # the third failure starts a 10 s block
            status, body, _h = await _status(a, srv, wrong)
            assert status == 401 and body["error"]["code"] == "INVALID_CREDENTIALS"
        status, body, headers = await _status(a, srv, wrong)
        assert status == 429 and headers["Retry-After"] == "10", (status, body)
        assert body["error"]["code"] == "RATE_LIMITED" and body["error"]["retry_after_s"] == 10
        # while blocked, the address gets 429 before its credential is looked at, valid or not ...
        assert (await _status(a, srv, API_KEY))[0] == 429
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            async with a.ws_connect(srv.ws_url, params={"api_key": API_KEY}):
                pass
        assert e.value.status == 429 and e.value.headers["Retry-After"] == "10"
        # ... and a valid key from another address is not affected at all
        assert (await _status(b, srv, API_KEY))[0] == 200
        assert await _stream_owner(b, srv, {"api_key": API_KEY}) == key_id_for(API_KEY)
        assert (await _status(b, srv, wrong))[0] == 401  # b has its own count: 1 of 3
        # requests without a credential guess nothing and are not counted
        for _ in range(5):
            assert (await _status(c, srv, None))[1]["error"]["code"] == "UNAUTHORIZED"
        assert (await _status(c, srv, API_KEY))[0] == 200

        clock.now += 10  # the block is over: the valid key works from a again
        assert (await _status(a, srv, API_KEY))[0] == 200
        for _ in range(3):
            assert (await _status(a, srv, wrong))[0] == 401
        status, _b, headers = await _status(a, srv, wrong)
        assert status == 429 and headers["Retry-After"] == "20"  # the next block doubles
        clock.now += 20
        for _ in range(3):
            assert (await _status(a, srv, wrong))[0] == 401
        assert (await _status(a, srv, wrong))[2]["Retry-After"] == "25"  # capped at backoff_max_s

        # failures further apart than the window do not add up
        for _ in range(2):
            assert (await _status(b, srv, wrong))[0] == 401  # b: 3 failures, but the first is ...
        clock.now += 25 + 61  # ... and these two are now more than a window old
        for _ in range(2):
            assert (await _status(b, srv, wrong))[0] == 401
        assert (await _status(b, srv, API_KEY))[0] == 200

    async with aiohttp.ClientSession() as s, s.get(f"{srv.url}/metrics") as r:
        metrics = await r.text()
    assert 'callbridge_auth_failures_total{code="RATE_LIMITED"} 5.0' in metrics, metrics
    assert 'callbridge_auth_failures_total{code="INVALID_CREDENTIALS"} 14.0' in metrics
    assert 'callbridge_auth_failures_total{code="UNAUTHORIZED"} 5.0' in metrics


def test_backoff_sources_group_an_ipv6_host_by_its_64() -> None:
    """One IPv6 host usually holds a whole /64: rotating addresses within it does not reset the count."""
    assert source_of("2001:db8:1:2::1") == source_of("2001:db8:1:2:ffff:ffff:ffff:fffe") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("::ffff:192.0.2.7") == source_of("192.0.2.7") == "192.0.2.7"
    assert source_of("fe80::1%eth0") == "fe80::/64" and source_of(None) == "unknown"
