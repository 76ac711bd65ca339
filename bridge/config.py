"""Service configuration: one typed, immutable `Config` built from four layers.

Precedence, later wins: built-in defaults < TOML file < environment < command-line flags.
The defaults live here, in code, so an installed service runs with no file at all; the shipped
`config/callbridge.toml` only documents them (a test keeps the two equal).

Environment names: `CALLBRIDGE_<NAME>` for the `server` section (`CALLBRIDGE_HTTP_PORT`,
`CALLBRIDGE_DATA_DIR`, `CALLBRIDGE_API_KEYS` comma-separated) and
`CALLBRIDGE_<SECTION>_<NAME>` for the others (`CALLBRIDGE_LIMITS_IDLE_TIMEOUT_S`).
`CALLBRIDGE_MODEL` is short for `CALLBRIDGE_MODEL_NAME` (it mirrors `--model`),
`CALLBRIDGE_DATABASE_URL` for `CALLBRIDGE_STORAGE_URL` (it mirrors `--database-url`); when both
names of one setting are set the full one wins. `CALLBRIDGE_CONFIG` names the file when
`--config` is not given.

Every value is type-checked and range-checked; a bad one raises `ConfigError` naming the key and
where it came from (file path, environment variable or flag), because "invalid port" alone sends
the operator hunting through three places.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bridge.keyformat import config_key_problem
from bridge.webhooks.model import EndpointError, check_endpoint

ENV_PREFIX = "CALLBRIDGE_"
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "callbridge.toml"

VAD_KINDS = ("silero", "webrtc", "energy")  # bridge.recognizer.vad.VAD_KINDS (not imported: numpy)
ENGINES = ("whisper.cpp",)  # bridge.recognizer.engines.ENGINES (not imported: numpy)
LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
STORE_SCHEMES = ("sqlite", "postgresql", "postgres")  # bridge.stores.registry.BACKENDS (not imported: config is the base layer)
BUS_SCHEMES = ("memory", "redis", "rediss")  # bridge.events.registry.BUSES (not imported: same reason)


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range; the message names its source."""


def _default_log_format() -> str:
    """Humans read a terminal, log collectors read everything else."""
    try:
        return "console" if sys.stderr.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def _f(default: Any, help: str, **check: Any) -> Any:
    """A dataclass field carrying its one-line help and its checks (min, max, gt, choices)."""
    return field(default=default, metadata={"help": help, **check})


@dataclass(frozen=True)
class ServerConfig:
    host: str = _f("127.0.0.1", "address the HTTP/WS and SIP listeners bind to", nonempty=True)
    http_port: int = _f(8080, "HTTP + WebSocket port", min=1, max=65535)
    sip_port: int = _f(5060, "SIP port (UDP and TCP); 0 = any free port", min=0, max=65535)
    data_dir: str = _f("./data", "SQLite database, recordings and the generated API key", nonempty=True)
    api_keys: tuple[str, ...] = _f((), "accepted API keys, at least 16 characters each; empty: `serve` creates "
                                       "one in data_dir", api_keys=True)
    trusted_proxies: tuple[str, ...] = _f((), "CIDRs of reverse proxies (nginx) whose X-Forwarded-For names the "
                                              "client (authentication backoff); empty: the peer address", cidrs=True)


@dataclass(frozen=True)
class StorageConfig:
    url: str = _f("", "database URL (sqlite:///PATH, postgresql://...; --database-url, CALLBRIDGE_DATABASE_URL); "
                      "empty: sqlite:///<data_dir>/callbridge.db", store_url=True)
    recordings_dir: str = _f("", "where finished recordings are kept, readable by every node (a shared mount "
                                 "in a cluster); empty: data_dir/recordings, where live ones are written")


@dataclass(frozen=True)
class ClusterConfig:
    node_id: str = _f("", "this node's id in the shared database; empty: read (or create) data_dir/node_id, a "
                          "random id kept across restarts (docs/cluster.md)")
    advertise_url: str = _f("", "this node's HTTP base URL other nodes can reach; empty: http://host:http_port")
    heartbeat_s: float = _f(2.0, "seconds between this node's heartbeats (and looks for dead nodes)", gt=0)
    node_ttl_s: float = _f(10.0, "a node whose last heartbeat is older than this is dead: a live node fails its "
                                 "live jobs", gt=0)


@dataclass(frozen=True)
class BusConfig:
    url: str = _f("", "event bus URL: empty or memory:// = in-process (one node); redis://[:PASSWORD@]HOST:PORT/DB "
                      "(rediss:// for TLS) = a Redis stream every node shares (needs callbridge[cluster])",
                  bus_url=True)
    buffer_events: int = _f(100000, "events kept for the shared bus while it cannot be reached; then partials "
                                    "are dropped first", min=1)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("tiny.en", "model name or path", nonempty=True)
    engine: str = _f("whisper.cpp", "speech recognition engine that loads the model", choices=ENGINES)
    pool_size: int = _f(0, "recognizer contexts; 0 = number of CPU cores", min=0)
    threads_per_context: int = _f(1, "CPU threads each context decodes with", min=1)

    @property
    def effective_pool_size(self) -> int:
        return self.pool_size or (os.cpu_count() or 1)


@dataclass(frozen=True)
class RecognizerConfig:
    endpointing_ms: int = _f(700, "silence that ends an utterance", min=0, max=20000)
    partial_interval_s: float = _f(0.4, "new audio between partial re-decodes", gt=0)
    max_utterance_s: float = _f(15.0, "long utterances are committed in pieces past this", gt=0)
    vad: str = _f("silero", "voice activity detector", choices=VAD_KINDS)

    def streamer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `StreamerConfig`, whose field names differ slightly."""
        return {
            "endpointing_ms": self.endpointing_ms,
            "partial_interval_s": self.partial_interval_s,
            "max_utterance_s": self.max_utterance_s,
            "vad_kind": self.vad,
        }


@dataclass(frozen=True)
class LimitsConfig:
    first_audio_timeout_s: float = _f(10.0, "close a session that sends no audio this long", gt=0)
    idle_timeout_s: float = _f(60.0, "close a session idle this long", gt=0)
    max_duration_s: float = _f(10800.0, "longest session", gt=0)
    max_sessions_per_key: int = _f(10, "concurrent sessions per API key", min=1)
    max_frame_bytes: int = _f(1048576, "largest WebSocket frame accepted", min=1)
    drain_timeout_s: float = _f(30.0, "on SIGTERM, how long live sessions get to finish", gt=0)
    min_free_disk_mb: float = _f(16.0, "refuse new sessions while the data directory has less free space (MiB)",
                                 min=0)


@dataclass(frozen=True)
class CapacityConfig:
    max_legs: int = _f(0, "live legs admitted at once; 0 = model.pool_size x legs_per_context", min=0)
    legs_per_context: int = _f(0, "legs one decode context keeps on time; 0 = from the measured decode speed: "
                                  "final_share / (decode s per audio s x speech_share)", min=0)
    final_share: float = _f(0.3, "share of each decode context's time planned for finals (the rest absorbs "
                                 "partials and bursts); sizes the leg cap when legs_per_context is 0", gt=0, max=1)
    speech_share: float = _f(0.8, "seconds of final audio a live leg needs decoded per second: its speech "
                                  "plus the silence kept around it (dense speech ~0.8, a two-party call leg ~0.4)",
                             gt=0, max=2)
    max_final_latency_s: float = _f(1.2, "refuse new sessions while finals spend longer than this in the "
                                         "decode pool (p95 over window_s, or the oldest one waiting)", gt=0)
    window_s: float = _f(30.0, "how far back the final latency p95 looks", gt=0)
    min_finals: int = _f(5, "finals in window_s the latency p95 needs before it can refuse (one long "
                            "utterance is not a trend)", min=1)
    retry_after_s: int = _f(5, "Retry-After sent with a capacity refusal", min=1)


@dataclass(frozen=True)
class CreditsConfig:
    per_minute: int = _f(220, "credits charged per minute of audio", min=0)
    usage_interval_s: float = _f(5.0, "seconds between usage messages", gt=0)


@dataclass(frozen=True)
class SipConfig:
    enabled: bool = _f(True, "answer SIP calls (UDP and TCP on server.sip_port)")
    workers: int = _f(4, "pjsua2 worker processes; each holds calls_per_worker calls", min=1, max=64)
    calls_per_worker: int = _f(4, "calls per worker (the pjsua2 wheel allows 4; a bridged call takes 2)",
                               min=1, max=4)
    worker_base_port: int = _f(0, "SIP port of worker 0 (then +1 each); 0 = sip_port + 1", min=0, max=65535)
    rtp_port_start: int = _f(20000, "first RTP port; each worker takes a block of 100", min=1024, max=65000)
    rtp_timeout_s: float = _f(30.0, "end a call after this long without RTP from the caller", gt=0)
    codecs: tuple[str, ...] = _f(("PCMU/8000", "PCMA/8000", "G722/16000"), "codecs offered, in priority order")
    routes: tuple[str, ...] = _f((), "bridge mode: USER=SIP_URI entries by request-URI user; * matches any")
    target_header: str = _f("X-Callbridge-Target", "INVITE header that names the bridge target")
    allow_target_header: bool = _f(False, "let callers pick the bridge target with target_header (trusted networks only)")
    transcribe_agent: bool = _f(True, "transcribe the bridged (agent) leg too")
    public_address: str = _f("", "address put in SDP and Contact; empty = server.host")
    owner_key: str = _f("", "API key id that owns SIP jobs; empty = the oldest active key")
    tcp_max_connections: int = _f(512, "SIP over TCP: connections open at once; more are closed at once", min=1)
    tcp_max_connections_per_source: int = _f(32, "SIP over TCP: connections from one IP address", min=1)
    tcp_max_message_bytes: int = _f(32768, "SIP over TCP: largest header section, and largest body; "
                                           "larger gets 413 (or 513) and the connection closed", min=1024)
    tcp_message_timeout_s: float = _f(10.0, "SIP over TCP: a message must arrive whole this long after its "
                                            "first byte (slow senders are cut off)", gt=0)
    tcp_idle_timeout_s: float = _f(900.0, "SIP over TCP: close a connection silent this long", gt=0)


@dataclass(frozen=True)
class WebRtcConfig:
    enabled: bool = _f(True, "accept browser calls at POST /v1/webrtc/offer")
    ice_servers: tuple[str, ...] = _f((), "STUN/TURN URLs (stun:host:port, turn:host:port); none by default")
    turn_username: str = _f("", "username for the turn: servers")
    turn_credential: str = _f("", "credential for the turn: servers")
    loopback_candidates: bool = _f(True, "offer 127.0.0.1 as an ICE host candidate (browsers on this machine)")
    media_timeout_s: float = _f(10.0, "end a call after this long without audio from the browser", gt=0)
    connect_timeout_s: float = _f(30.0, "end a call whose peer connection is not up after this long", gt=0)


@dataclass(frozen=True)
class WebhooksConfig:
    enabled: bool = _f(True, "deliver events to webhook endpoints (the outbox keeps filling while off)")
    timeout_s: float = _f(10.0, "one delivery attempt's time limit (connect + response)", gt=0)
    retry_period_s: float = _f(86400.0, "keep retrying a delivery this long, then mark it dead", gt=0)
    backoff_initial_s: float = _f(1.0, "wait after the first failed attempt; doubles each time, with jitter", gt=0)
    backoff_max_s: float = _f(600.0, "longest wait between attempts", gt=0)
    concurrency: int = _f(32, "delivery attempts in flight at once (one per job and endpoint)", min=1, max=1000)
    owner_concurrency: int = _f(8, "attempts one key's endpoints may have in flight (the rest of the pool stays "
                                   "free for other keys)", min=1, max=1000)
    endpoint_concurrency: int = _f(4, "attempts one endpoint may have in flight (different jobs)", min=1, max=1000)
    breaker_failures: int = _f(5, "consecutive failed attempts (timeouts included) that open an endpoint's "
                                  "circuit breaker", min=1)
    breaker_cooldown_s: float = _f(30.0, "an open breaker waits this long, then lets one probe attempt through", gt=0)
    allow_private_targets: bool = _f(False, "let key-owned endpoints reach loopback, private, link-local and other "
                                            "non-public addresses (operator endpoints always may)")
    allowed_target_networks: tuple[str, ...] = _f((), "CIDRs key-owned endpoints may reach although not public, "
                                                      "e.g. 10.20.0.0/16", cidrs=True)
    max_endpoints_per_key: int = _f(20, "webhook endpoints one API key may register", min=0)
    retention_s: float = _f(604800.0, "delivered and dead deliveries are kept this long", gt=0)
    endpoints: tuple[dict, ...] = _f((), "operator endpoints: [[webhooks.endpoints]] tables with name, url, "
                                         "secret, events, sources, owner (env/flag: a JSON list)")


@dataclass(frozen=True)
class AuthConfig:
    jwt_hs256_secret: str = _f("", "shared secret accepting HS256 JWTs; empty: HS256 off")
    jwt_rs256_public_key: str = _f("", "PEM file of the key accepting RS256 JWTs; empty: RS256 off")
    jwt_audience: str = _f("callbridge", "required `aud` claim of JWTs")
    jwt_issuer: str = _f("", "required `iss` claim of JWTs; empty: any issuer")
    jwt_leeway_s: float = _f(30.0, "clock skew allowed on exp/nbf", min=0)
    failures_before_backoff: int = _f(10, "refused credentials one address may send within failure_window_s "
                                          "before it gets 429; 0 = no backoff", min=0)
    failure_window_s: float = _f(60.0, "the window failed authentications are counted in", gt=0)
    backoff_initial_s: float = _f(2.0, "first block of an address; each further one doubles", gt=0)
    backoff_max_s: float = _f(300.0, "longest block of an address", gt=0)


@dataclass(frozen=True)
class LoggingConfig:
    format: str = field(
        default_factory=_default_log_format,
        metadata={"help": "console or json; auto = console on a TTY, else json",
                  "choices": LOG_FORMATS, "auto": True},
    )
    level: str = _f("info", "lowest level logged", choices=LOG_LEVELS)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    recognizer: RecognizerConfig = field(default_factory=RecognizerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    credits: CreditsConfig = field(default_factory=CreditsConfig)
    sip: SipConfig = field(default_factory=SipConfig)
    webrtc: WebRtcConfig = field(default_factory=WebRtcConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self, mask_keys: bool = True) -> dict[str, dict[str, Any]]:
        """Plain nested dict for printing; API keys masked so a pasted dump leaks nothing."""
        out: dict[str, dict[str, Any]] = {}
        for sec in dataclasses.fields(self):
            values = {}
            for f in dataclasses.fields(getattr(self, sec.name)):
                v = getattr(getattr(self, sec.name), f.name)
                if isinstance(v, tuple) and f.name == "endpoints":
                    v = [{**e, "secret": _mask(e["secret"])} if mask_keys else dict(e) for e in v]
                elif isinstance(v, tuple):
                    v = [_mask(k) for k in v] if (mask_keys and f.name == "api_keys") else list(v)
                elif mask_keys and f.name in ("jwt_hs256_secret", "turn_credential") and v:
                    v = _mask(v)
                elif mask_keys and sec.name in ("storage", "bus") and f.name == "url":
                    v = mask_url_password(v)
                values[f.name] = v
            out[sec.name] = values
        return out


def _mask(key: str) -> str:
    return key[:4] + "…" if len(key) >= 12 else "****"


def mask_url_password(url: str) -> str:
    """scheme://user:secret@host/db -> scheme://user:****@host/db (a database or Redis URL may carry
    one; redis://:secret@host has an empty user)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not (sep and at and ":" in creds):
        return url
    return f"{scheme}://{creds.split(':', 1)[0]}:****@{host}"


def _bus_url_problem(url: str) -> str | None:
    """Why `url` cannot be bus.url, or None; the bus checks the rest when it connects."""
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep or (not rest and scheme.lower() != "memory"):
        return f"must look like redis://HOST:PORT/DB or memory://, got {mask_url_password(url)!r}"
    if scheme.lower() not in BUS_SCHEMES:
        return f"has unknown scheme {scheme!r}; known: {', '.join(BUS_SCHEMES)}"
    return None


def _store_url_problem(url: str) -> str | None:
    """Why `url` cannot be storage.url, or None; the backend checks the rest when it opens it."""
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep or not rest:
        return f"must look like SCHEME://..., e.g. sqlite:///var/lib/callbridge/callbridge.db, got {url!r}"
    if scheme.lower() not in STORE_SCHEMES:
        return f"has unknown scheme {scheme!r}; known: {', '.join(STORE_SCHEMES)}"
    return None


# --------------------------------------------------------------------------- schema

_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "storage": StorageConfig,
    "cluster": ClusterConfig,
    "bus": BusConfig,
    "model": ModelConfig,
    "recognizer": RecognizerConfig,
    "limits": LimitsConfig,
    "capacity": CapacityConfig,
    "credits": CreditsConfig,
    "sip": SipConfig,
    "webrtc": WebRtcConfig,
    "webhooks": WebhooksConfig,
    "auth": AuthConfig,
    "logging": LoggingConfig,
}
# With `from __future__ import annotations` field types are strings; map them to kinds.
_KINDS = {"str": str, "int": int, "float": float, "bool": bool, "tuple[str, ...]": list, "tuple[dict, ...]": dict}
_ENDPOINT_KEYS = {"name", "url", "secret", "events", "sources", "owner", "description"}

# flag dest -> (section, key); these are the only settings with flags (see the spec, "Running it").
FLAGS: dict[str, tuple[str, str]] = {
    "host": ("server", "host"),
    "http_port": ("server", "http_port"),
    "sip_port": ("server", "sip_port"),
    "data_dir": ("server", "data_dir"),
    "model": ("model", "name"),
    "database_url": ("storage", "url"),
    "bus_url": ("bus", "url"),
}
# Short environment names (mirroring a flag), read before the full ones, which win: see the docstring.
ENV_ALIASES: dict[str, tuple[str, str]] = {
    ENV_PREFIX + "MODEL": ("model", "name"),
    ENV_PREFIX + "DATABASE_URL": ("storage", "url"),
}


def _schema(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(_SECTIONS[section])}


def env_name(section: str, key: str) -> str:
    """The environment variable for a setting: server keys are flat, the others prefixed."""
    return ENV_PREFIX + (key if section == "server" else f"{section}_{key}").upper()


def _convert(section: str, key: str, value: Any, source: str, from_string: bool) -> Any:
    """Type-check `value` (parsing it first when it came as text) and range-check it."""
    f = _schema(section)[key]
    kind = _KINDS[f.type] if isinstance(f.type, str) else (list if f.type == tuple[str, ...] else f.type)
    meta = f.metadata
    name = f"{section}.{key}"

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{name} {msg} (from {source})")

    if from_string and isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is int:
                value = int(text)
            elif kind is float:
                value = float(text)
            elif kind is bool:
                low = text.lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                value = low in ("1", "true", "yes", "on")
            elif kind is list:
                value = [p.strip() for p in text.split(",") if p.strip()]
            elif kind is dict:
                value = json.loads(text) if text else []
        except ValueError:
            raise bad(f"must be {_kind_word(kind)}, got {value!r}") from None

    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"must be an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"must be a number, got {value!r}")
        value = float(value)
    elif kind is bool:
        if not isinstance(value, bool):
            raise bad(f"must be true or false, got {value!r}")
    elif kind is str:
        if not isinstance(value, str):
            raise bad(f"must be a string, got {value!r}")
        if meta.get("auto") and value.strip().lower() == "auto":
            value = _default_log_format()
        if "choices" in meta:
            value = value.strip().lower()
    elif kind is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(f"must be a list of strings, got {value!r}")
        value = tuple(value)
        if meta.get("cidrs"):
            for v in value:
                try:
                    ipaddress.ip_network(v, strict=False)
                except ValueError:
                    raise bad(f"must be a list of CIDR networks (10.0.0.0/8, fd00::/8), got {v!r}") from None
    elif kind is dict:
        return _endpoint_tables(value, bad)

    if meta.get("api_keys"):
        for i, secret in enumerate(value, 1):
            problem = config_key_problem(secret)
            if problem:  # the key itself is never echoed: it is a secret
                raise bad(f"key {i} of {len(value)}: {problem}")
    if meta.get("store_url"):
        problem = _store_url_problem(value)
        if problem:
            raise bad(problem)
    if meta.get("bus_url"):
        problem = _bus_url_problem(value)
        if problem:
            raise bad(problem)
    if meta.get("nonempty") and not value.strip():
        raise bad("must not be empty")
    if "choices" in meta and value not in meta["choices"]:
        raise bad(f"must be one of {', '.join(meta['choices'])}, got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(f"must be in {lo}..{hi}, got {value!r}" if hi is not None else f"must be >= {lo}, got {value!r}")
    if "gt" in meta and value <= meta["gt"]:
        raise bad(f"must be > {meta['gt']}, got {value!r}")
    return value


def _kind_word(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", list: "a list",
            dict: "a JSON list of tables"}.get(kind, "a string")


def _endpoint_tables(value: Any, bad: Any) -> tuple[dict, ...]:
    """`webhooks.endpoints`: each a table with a unique `name`, `url` and `secret`; the rest is
    checked by the webhook module's own rules (bridge/webhooks/model.py), the same as the API's."""
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise bad(f"must be a list of tables, got {value!r}")
    out, names = [], set()
    for i, table in enumerate(value):
        unknown = set(table) - _ENDPOINT_KEYS
        if unknown:
            raise bad(f"[{i}] has unknown keys {sorted(unknown)}")
        name = table.get("name")
        if not isinstance(name, str) or not name.strip() or not name.replace("-", "").replace("_", "").isalnum():
            raise bad(f"[{i}].name must be letters, digits, - or _, got {name!r}")
        if name in names:
            raise bad(f"[{i}].name {name!r} is used twice")
        names.add(name)
        owner = table.get("owner", "")
        if not isinstance(owner, str):
            raise bad(f"[{i}].owner must be an API key id or empty, got {owner!r}")
        try:
            spec = check_endpoint({k: v for k, v in table.items() if k not in ("name", "owner")}, creating=True,
                                  secret_required=True)
        except EndpointError as e:
            raise bad(f"[{i}] ({name}): {e}") from None
        out.append({**spec, "name": name, "owner": owner})
    return tuple(out)


# --------------------------------------------------------------------------- layers

def _from_file(path: Path, out: dict[str, dict[str, Any]]) -> None:
    source = f"config file {path}"
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for section, table in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"unknown section [{section}] (from {source})")
        if not isinstance(table, dict):
            raise ConfigError(f"{section} must be a table [{section}] (from {source})")
        schema = _schema(section)
        for key, value in table.items():
            if key not in schema:
                raise ConfigError(f"unknown setting {section}.{key} (from {source})")
            out[section][key] = _convert(section, key, value, source, from_string=False)


def _from_env(env: Mapping[str, str], out: dict[str, dict[str, Any]]) -> None:
    # Unknown CALLBRIDGE_* variables are ignored: other tools may share the prefix.
    for alias, (section, key) in ENV_ALIASES.items():
        if alias in env:
            out[section][key] = _convert(section, key, env[alias], f"environment variable {alias}", True)
    for section in _SECTIONS:
        for key in _schema(section):
            var = env_name(section, key)
            if var in env:
                out[section][key] = _convert(section, key, env[var], f"environment variable {var}", True)


def _from_flags(overrides: Mapping[str, Any], out: dict[str, dict[str, Any]]) -> None:
    for dest, value in overrides.items():
        if dest == "config" or value is None:
            continue
        if dest in FLAGS:
            section, key = FLAGS[dest]
            source = f"flag --{dest.replace('_', '-')}"
        elif "." in dest and dest.split(".", 1)[0] in _SECTIONS and dest.split(".", 1)[1] in _schema(dest.split(".", 1)[0]):
            section, key = dest.split(".", 1)
            source = f"override {dest}"
        else:
            raise ConfigError(f"unknown setting {dest!r} (from command line)")
        out[section][key] = _convert(section, key, value, source, from_string=True)


def load_config(
    argv_overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike | None = None,
) -> Config:
    """Build the `Config`: defaults < TOML file < environment < flags.

    `argv_overrides` maps flag dests (`host`, `http_port`, `sip_port`, `data_dir`, `model`,
    `database_url`, `config`) or dotted keys (`limits.idle_timeout_s`) to values; None values are ignored so an
    argparse namespace can be passed as is. `env` defaults to `os.environ`. The file is
    `config_file`, else the `config` override, else `CALLBRIDGE_CONFIG`, else the shipped
    `config/callbridge.toml` if it exists (an installed service may have none: defaults suffice).
    An explicitly named file that is missing is an error.
    """
    overrides = dict(argv_overrides or {})
    env = os.environ if env is None else env
    layers: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}

    explicit = config_file or overrides.get("config") or env.get(ENV_PREFIX + "CONFIG")
    if explicit:
        _from_file(Path(explicit), layers)
    elif DEFAULT_CONFIG_PATH.is_file():
        _from_file(DEFAULT_CONFIG_PATH, layers)
    _from_env(env, layers)
    _from_flags(overrides, layers)
    config = Config(**{s: cls(**layers[s]) for s, cls in _SECTIONS.items()})
    if config.cluster.node_ttl_s <= config.cluster.heartbeat_s:
        raise ConfigError(f"cluster.node_ttl_s ({config.cluster.node_ttl_s:g}) must be longer than "
                          f"cluster.heartbeat_s ({config.cluster.heartbeat_s:g}): a live node would be taken "
                          "for dead between two heartbeats")
    return config


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Register the flags that override config; values stay text so errors name the flag."""
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: config/callbridge.toml)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--http-port", metavar="PORT", help="HTTP + WebSocket port (default 8080)")
    parser.add_argument("--sip-port", metavar="PORT", help="SIP port (default 5060)")
    parser.add_argument("--data-dir", metavar="DIR", help="data directory (default ./data)")
    parser.add_argument("--model", metavar="NAME_OR_PATH", help="model name or path (default tiny.en)")
    parser.add_argument("--database-url", metavar="URL", help="storage.url: sqlite:///PATH or "
                        "postgresql://USER@HOST/DB (default: data-dir/callbridge.db)")
    parser.add_argument("--bus-url", metavar="URL", help="event bus: redis://HOST:PORT/DB for a cluster "
                                                         "(default: in-process)")


def config_from_args(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    """`load_config` from a namespace filled by `add_config_flags`; raises `ConfigError`."""
    overrides = {dest: getattr(ns, dest, None) for dest in (*FLAGS, "config")}
    return load_config(overrides, env=env, config_file=overrides.pop("config"))
