"""Webhook endpoints and deliveries, and the rules an endpoint spec must follow.

The same `check_endpoint` validates `POST/PATCH /v1/webhooks` bodies and the operator's
`[[webhooks.endpoints]]` tables, so both paths refuse the same mistakes with the same words.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from bridge.jobs.model import JobSource

__all__ = [
    "ALL_EVENT_TYPES",
    "DEFAULT_EVENTS",
    "SOURCES",
    "Delivery",
    "DeliveryStatus",
    "Endpoint",
    "EndpointError",
    "check_endpoint",
    "new_secret",
]

# Partials and usage are opt-in: a busy call sends several partials a second to every endpoint.
ALL_EVENT_TYPES = ("call_started", "partial", "final", "usage", "dtmf", "call_ended")
DEFAULT_EVENTS = ("call_started", "final", "dtmf", "call_ended")
SOURCES = tuple(s.value for s in JobSource)  # the job sources (one list: bridge/jobs/model.py)
MIN_SECRET, MAX_SECRET = 16, 256
MAX_URL = 2048
ANY_OWNER = "*"  # operator endpoints from config without an owner receive every job's events


class EndpointError(ValueError):
    """An endpoint spec breaks a rule; the message says which field and why."""


class DeliveryStatus(str, Enum):
    PENDING = "pending"  # waiting for its turn or its next attempt
    DELIVERED = "delivered"  # a 2xx came back
    DEAD = "dead"  # failed for the whole retry period; redeliver to try again


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(24)


@dataclass
class Endpoint:
    id: str
    owner: str
    url: str
    secret: str
    events: tuple[str, ...] = DEFAULT_EVENTS
    sources: tuple[str, ...] = ()  # empty: every source
    description: str = ""
    enabled: bool = True
    managed_by: str = "api"  # "api" or "config" (operator endpoints are changed in config only)
    created_at: float = 0.0
    updated_at: float = 0.0

    def wants(self, event_type: str, owner: str, source: str) -> bool:
        return (self.enabled and event_type in self.events and (self.owner in (ANY_OWNER, owner))
                and (not self.sources or source in self.sources))

    def to_dict(self, with_secret: bool = False) -> dict[str, Any]:
        d = {"id": self.id, "url": self.url, "events": list(self.events), "sources": list(self.sources),
             "description": self.description, "enabled": self.enabled, "managed_by": self.managed_by,
             "secret_hint": "…" + self.secret[-4:], "created_at": self.created_at, "updated_at": self.updated_at}
        if with_secret:
            d["secret"] = self.secret
        return d


@dataclass
class Delivery:
    id: int
    endpoint_id: str
    job_id: str
    event_id: str
    seq: int
    type: str
    body: str  # the exact JSON text POSTed, so a retry signs and sends the same bytes
    status: DeliveryStatus
    attempts: int = 0
    created_at: float = 0.0
    next_attempt_at: float = 0.0
    last_attempt_at: float | None = None
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None
    lease_node: str | None = None  # the node attempting it now (see bridge/stores/webhooks.py)
    lease_until: float | None = None  # the store's clock; not part of the API's view

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "endpoint_id": self.endpoint_id, "job_id": self.job_id, "event_id": self.event_id,
                "seq": self.seq, "type": self.type, "status": self.status.value, "attempts": self.attempts,
                "created_at": self.created_at,
                "next_attempt_at": self.next_attempt_at if self.status is DeliveryStatus.PENDING else None,
                "last_attempt_at": self.last_attempt_at, "last_status": self.last_status,
                "last_error": self.last_error, "delivered_at": self.delivered_at, "event": json.loads(self.body)}


def _str_list(value: Any, name: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise EndpointError(f"{name} must be a list of strings, got {value!r}")
    bad = sorted(set(value) - set(allowed))
    if bad:
        raise EndpointError(f"{name} must be among {', '.join(allowed)}; got {bad}")
    return tuple(v for v in allowed if v in value)  # canonical order, no repeats


def check_endpoint(body: Any, *, creating: bool, secret_required: bool = False) -> dict[str, Any]:
    """Validate a create (all fields) or update (some fields) spec; returns the clean fields."""
    if not isinstance(body, dict):
        raise EndpointError("the body must be a JSON object")
    unknown = set(body) - {"url", "secret", "events", "sources", "description", "enabled"}
    if unknown:
        raise EndpointError(f"unknown fields {sorted(unknown)}")
    out: dict[str, Any] = {}
    if "url" in body or creating:
        url = body.get("url")
        if not isinstance(url, str) or not url:
            raise EndpointError("url is required: the http(s) address that receives the POSTs")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EndpointError(f"url must be an absolute http:// or https:// URL, got {url!r}")
        if len(url) > MAX_URL:
            raise EndpointError(f"url is longer than {MAX_URL} characters")
        out["url"] = url
    if "secret" in body:
        secret = body["secret"]
        if not isinstance(secret, str) or not MIN_SECRET <= len(secret) <= MAX_SECRET:
            raise EndpointError(f"secret must be a string of {MIN_SECRET}..{MAX_SECRET} characters")
        out["secret"] = secret
    elif secret_required:
        raise EndpointError("secret is required")
    if "events" in body:
        out["events"] = _str_list(body["events"], "events", ALL_EVENT_TYPES)
        if not out["events"]:
            raise EndpointError("events must name at least one event type")
    elif creating:
        out["events"] = DEFAULT_EVENTS
    if "sources" in body:
        out["sources"] = _str_list(body["sources"], "sources", SOURCES)
    elif creating:
        out["sources"] = ()
    if "description" in body:
        if not isinstance(body["description"], str) or len(body["description"]) > 500:
            raise EndpointError("description must be a string of at most 500 characters")
        out["description"] = body["description"]
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            raise EndpointError("enabled must be true or false")
        out["enabled"] = body["enabled"]
    return out
