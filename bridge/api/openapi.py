"""`GET /openapi.json`: an OpenAPI 3.1 description of every HTTP route the service registers.

Written by hand, next to the routes rather than generated from them, so that it says what each
route means; tests/test_openapi.py keeps it honest by comparing its paths and methods with the
routes of the real app (both ways), validating it against the OpenAPI 3.1 schema, and checking
real answers of the service (statuses, bodies with every object closed, Retry-After) against it.
A handler that starts returning a new field or status must be described here too. WebSocket
routes are described as the GET that upgrades (101); their frames are docs/stream-protocol.md's.
Every GET also answers HEAD (aiohttp's default); HEAD is not listed. No credential is needed to
read it, as with /healthz.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata
from typing import Any

from aiohttp import web

from bridge.jobs.model import JobSource

__all__ = ["PATH", "add_routes", "document"]

PATH = "/openapi.json"

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _response(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


_RETRY_AFTER = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}  # on temporary refusals only


# Every route that takes a credential: 401 for a refused one, 429 while the caller's address is in
# authentication backoff (bridge/backoff.py; checked before the credential, WebSockets included).
_AUTH_ERRORS = {"401": _response("Unauthorized"), "429": _response("AuthBackoff")}
# Routes that write (SQLite, files): the json_errors middleware answers 507 when the disk is full.
_FULL = {"507": _response("StorageFull")}
_NOT_FOUND = {"404": _error("no such item for this caller (items of other keys are not found either)")}
_BAD = {"400": _error("INVALID_REQUEST: a parameter or the body is not valid")}


def _param(name: str, where: str, description: str, schema: dict[str, Any] | None = None,
           required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "description": description, "required": required or where == "path",
            "schema": schema or {"type": "string"}}


def _id(name: str, what: str) -> dict[str, Any]:
    return _param(name, "path", what)


_LIMIT = _param("limit", "query", "items per page", {"type": "integer", "minimum": 1})
_CURSOR = _param("cursor", "query", "the `next` value of the previous page")
_JOB_ID = _id("job_id", "job id (`job_...`)")
_WEBHOOK_ID = _id("webhook_id", "webhook endpoint id")
_DELIVERY_ID = _id("delivery_id", "delivery id (an integer)")
_SOURCE = {"type": "string", "enum": [s.value for s in JobSource]}


def _websocket(summary: str, description: str, params: list[dict[str, Any]], tag: str,
               refusals: dict[str, Any]) -> dict[str, Any]:
    """Every refusal is an HTTP answer before the upgrade; `refusals` are the route's own."""
    return {"get": {
        "summary": summary, "tags": [tag], "description": description + " Frames: docs/stream-protocol.md.",
        "parameters": params,
        "responses": {"101": {"description": "Switching Protocols: the WebSocket is open"},
                      **_AUTH_ERRORS, **refusals,
                      "426": _error("UPGRADE_REQUIRED: a plain GET, not a WebSocket handshake")}}}


def _paths() -> dict[str, Any]:
    return {
        "/healthz": {"get": {
            "summary": "liveness and readiness", "tags": ["operations"], "security": [],
            "responses": {"200": _json(_ref("Health"), "ready: the model is loaded (and SIP listening when on); "
                                                         "`status` is `ok`, or `degraded` while new sessions are "
                                                         "refused because the data directory is under its "
                                                         "free-space reserve (`disk` says how full)"),
                          "503": _json(_ref("Health"), "`status` is `starting` or `draining`")}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics", "tags": ["operations"], "security": [],
            "responses": {"200": {"description": "Prometheus text exposition format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        PATH: {"get": {
            "summary": "this document", "tags": ["operations"], "security": [],
            "responses": {"200": _json({"type": "object"}, "the OpenAPI 3.1 document")}}},
        "/": {"get": {
            "summary": "the live-captions page (HTML)", "tags": ["page"], "security": [],
            "responses": {"200": {"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}},
                          "404": _error("the page is not installed")}}},
        "/static/{name}": {"get": {
            "summary": "the page's scripts and styles", "tags": ["page"], "security": [],
            "parameters": [_id("name", "file name, e.g. app.js")],
            "responses": {"200": {"description": "the file", "content": {"*/*": {"schema": {"type": "string"}}}},
                          "404": _error("no such file")}}},
        "/v1/transcription/stream": _websocket(
            "ingest socket: stream audio in, get partials and finals back",
            "JSON control frames and binary audio in; ready, partial, final, usage, completed or error out. "
            "Browsers pass the credential as ?api_key= or ?token= (a temporary token or JWT).",
            [_param("api_key", "query", "API key, for clients that cannot set headers"),
             _param("token", "query", "temporary token (`cbt_...`) or JWT")], "streaming",
            {"503": _error("UNAVAILABLE: the server is starting or shutting down (`retry_after_s` in the body)")}),
        "/v1/events": _websocket(
            "live events of every job of the caller's key (dashboards)",
            "Sends only; see docs/events.md. Temporary tokens are refused (401 TEMP_TOKEN_NOT_ALLOWED, not spent).",
            [_param("source", "query", "comma-separated sources to follow (default all)"),
             _param("types", "query", "comma-separated event types to send (default all)")], "events",
            _BAD),
        "/v1/calls/{job_id}/events": _websocket(
            "live events of one job, after a catch-up of its finals so far",
            "Sends only; see docs/events.md. Temporary tokens are refused (401 TEMP_TOKEN_NOT_ALLOWED, not spent).",
            [_JOB_ID, _param("after", "query", "resume after this seq", {"type": "integer"})], "events",
            {**_BAD, **_NOT_FOUND}),
        "/v1/webrtc/offer": {"post": {
            "summary": "WebRTC signaling: an SDP offer in, the answer and the job id out", "tags": ["webrtc"],
            "description": "See docs/webrtc.md. A temporary token is spent only by an offer that is accepted.",
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("WebRtcOffer")}}},
            "responses": {"200": _json(_ref("WebRtcAnswer"), "the SDP answer; the call is live"),
                          "400": _error("INVALID_CONFIG: a bad offer or config"), **_AUTH_ERRORS,
                          "402": _error("INSUFFICIENT_CREDITS"), "404": _error("WebRTC is disabled"),
                          "429": {**_error("RATE_LIMITED: too many sessions live for this key; or, with "
                                           "Retry-After and `retry_after_s`, too many refused credentials from "
                                           "this address (docs/auth.md, \"Backoff\")"),
                                  "headers": _RETRY_AFTER},
                          "500": _error("INTERNAL: the offer could not be answered (the job, if opened, ends failed)"),
                          "503": {**_error("UNAVAILABLE: the server is starting or shutting down (`retry_after_s` "
                                           "in the body); UPSTREAM_ERROR: shutting down; or RATE_LIMITED: the "
                                           "server is at its decode capacity (bridge/admission.py), with "
                                           "Retry-After and `retry_after_s`: retry later or on another node"),
                                  "headers": _RETRY_AFTER},
                          "507": _error("STORAGE_FULL: the data directory is full or under its free-space "
                                        "reserve; no session opens until space is freed")}}},
        "/v1/tokens": {"post": {
            "summary": "mint a single-use temporary token that opens one ingest session (a stream or a WebRTC "
                       "offer)", "tags": ["auth"],
            "description": "With an API key only (not a JWT or another token). See docs/auth.md.",
            "requestBody": {"required": False, "content": {JSON: {"schema": {
                "type": "object", "properties": {"expires_in": {"type": "integer", "minimum": 60,
                                                                "maximum": 360000, "default": 60}}}}}},
            "responses": {"201": _json(_ref("Token"), "the token (not stored in any cache)"), **_BAD,
                          **_AUTH_ERRORS, "403": _error("FORBIDDEN: not minted with an API key"), **_FULL}}},
        "/v1/jobs": {"get": {
            "summary": "the caller's jobs, newest first", "tags": ["jobs"],
            "parameters": [_LIMIT, _CURSOR,
                           _param("status", "query", "filter", {"type": "string",
                                                                "enum": ["live", "completed", "failed"]}),
                           _param("source", "query", "filter", _SOURCE),
                           _param("since", "query", "created at or after: unix seconds or ISO 8601")],
            "responses": {"200": _json({"type": "object", "required": ["jobs", "next"], "properties": {
                "jobs": {"type": "array", "items": _ref("JobSummary")},
                "next": {"type": ["string", "null"]}}}, "one page"), **_BAD, **_AUTH_ERRORS}}},
        "/v1/jobs/{job_id}": {
            "get": {"summary": "one job with its segments (a live job: the finals so far)", "tags": ["jobs"],
                    "parameters": [_JOB_ID],
                    "responses": {"200": _json(_ref("Job"), "the job"), **_AUTH_ERRORS, **_NOT_FOUND}},
            "patch": {"summary": "correct segment text or speakers, or relabel speakers", "tags": ["jobs"],
                      "parameters": [_JOB_ID],
                      "requestBody": {"required": True, "content": {JSON: {"schema": {
                          "type": "object", "properties": {
                              "segments": {"type": "array", "items": {"type": "object", "required": ["id"],
                                                                      "properties": {"id": {"type": "integer"},
                                                                                     "text": {"type": "string"},
                                                                                     "speaker": {"type": "string"}}}},
                              "speakers": {"type": "object", "additionalProperties": {"type": "string"}}}}}}},
                      "responses": {"200": _json(_ref("Job"), "the edited job"), **_BAD, **_AUTH_ERRORS,
                                    **_NOT_FOUND, "409": _error("JOB_LIVE: the job has not ended"), **_FULL}},
            "delete": {"summary": "delete the job, its transcript and its audio", "tags": ["jobs"],
                       "parameters": [_JOB_ID],
                       "responses": {"204": {"description": "deleted"}, **_AUTH_ERRORS, **_NOT_FOUND,
                                     "409": _error("JOB_LIVE: the job has not ended"), **_FULL}}},
        "/v1/jobs/{job_id}/transcript": {"get": {
            "summary": "export the transcript", "tags": ["jobs"],
            "parameters": [_JOB_ID, _param("format", "query", "export format",
                                           {"type": "string", "enum": ["json", "txt", "srt", "vtt"], "default": "json"}),
                           _param("download", "query", "true: Content-Disposition attachment")],
            "responses": {"200": {"description": "the transcript", "content": {
                JSON: {"schema": {"type": "object"}}, "text/plain": {"schema": {"type": "string"}},
                "application/x-subrip": {"schema": {"type": "string"}}, "text/vtt": {"schema": {"type": "string"}}}},
                **_BAD, **_AUTH_ERRORS, **_NOT_FOUND}}},
        "/v1/jobs/{job_id}/audio": {"get": {
            "summary": "the recorded audio: WAV, one channel per leg", "tags": ["jobs"], "parameters": [_JOB_ID],
            "responses": {"200": {"description": "WAV", "content": {"audio/wav": {"schema": {
                "type": "string", "contentMediaType": "audio/wav"}}}}, **_AUTH_ERRORS, **_NOT_FOUND}}},
        "/v1/webhooks": {
            "post": {"summary": "register a webhook endpoint", "tags": ["webhooks"],
                     "requestBody": {"required": True, "content": {JSON: {"schema": _ref("WebhookInput")}}},
                     "responses": {"201": _json(_ref("Webhook"), "the endpoint, with its `secret` (shown once)"),
                                   **_BAD, **_AUTH_ERRORS, "409": _error("TOO_MANY_WEBHOOKS"), **_FULL}},
            "get": {"summary": "this key's webhook endpoints", "tags": ["webhooks"],
                    "responses": {"200": _json(_ref("WebhookList"), "the endpoints"), **_AUTH_ERRORS}}},
        "/v1/webhooks/{webhook_id}": {
            "get": {"summary": "one endpoint", "tags": ["webhooks"], "parameters": [_WEBHOOK_ID],
                    "responses": {"200": _json(_ref("Webhook"), "the endpoint"), **_AUTH_ERRORS, **_NOT_FOUND}},
            "patch": {"summary": "change an endpoint", "tags": ["webhooks"], "parameters": [_WEBHOOK_ID],
                      "requestBody": {"required": True, "content": {JSON: {"schema": _ref("WebhookInput")}}},
                      "responses": {"200": _json(_ref("Webhook"), "the endpoint"), **_BAD, **_AUTH_ERRORS,
                                    **_NOT_FOUND, "409": _error("MANAGED_BY_CONFIG: an operator endpoint"), **_FULL}},
            "delete": {"summary": "delete an endpoint and its delivery log", "tags": ["webhooks"],
                       "parameters": [_WEBHOOK_ID],
                       "responses": {"204": {"description": "deleted"}, **_AUTH_ERRORS, **_NOT_FOUND,
                                     "409": _error("MANAGED_BY_CONFIG: an operator endpoint"), **_FULL}}},
        "/v1/webhooks/{webhook_id}/test": {"post": {
            "summary": "send a signed ping now", "tags": ["webhooks"], "parameters": [_WEBHOOK_ID],
            "responses": {"200": _json(_ref("Ping"), "the attempt's outcome"), **_AUTH_ERRORS, **_NOT_FOUND}}},
        "/v1/webhooks/{webhook_id}/deliveries": {"get": {
            "summary": "the delivery log, newest first", "tags": ["webhooks"],
            "parameters": [_WEBHOOK_ID, _LIMIT, _CURSOR,
                           _param("status", "query", "filter", {"type": "string",
                                                                "enum": ["pending", "delivered", "dead"]}),
                           _param("job_id", "query", "filter")],
            "responses": {"200": _json({"type": "object", "properties": {
                "deliveries": {"type": "array", "items": _ref("Delivery")},
                "next": {"type": ["string", "null"]}}}, "one page"), **_BAD, **_AUTH_ERRORS, **_NOT_FOUND}}},
        "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}": {"get": {
            "summary": "one delivery, with its event", "tags": ["webhooks"], "parameters": [_WEBHOOK_ID, _DELIVERY_ID],
            "responses": {"200": _json(_ref("Delivery"), "the delivery"), **_AUTH_ERRORS, **_NOT_FOUND}}},
        "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver": {"post": {
            "summary": "send one delivery again", "tags": ["webhooks"], "parameters": [_WEBHOOK_ID, _DELIVERY_ID],
            "responses": {"202": _json({"type": "object", "properties": {"redelivered": {"type": "integer"}}},
                                       "queued"), **_AUTH_ERRORS, **_NOT_FOUND, **_FULL}}},
        "/v1/webhooks/{webhook_id}/redeliver": {"post": {
            "summary": "every dead delivery back to pending, waiting ones retried now", "tags": ["webhooks"],
            "parameters": [_WEBHOOK_ID],
            "responses": {"202": _json({"type": "object", "properties": {"redelivered": {"type": "integer"},
                                                                         "retried_now": {"type": "integer"}}},
                                       "queued"), **_AUTH_ERRORS, **_NOT_FOUND, **_FULL}}},
    }


def _schemas() -> dict[str, Any]:
    num, text, nullable_num = {"type": "number"}, {"type": "string"}, {"type": ["number", "null"]}
    word = {"type": "object", "properties": {"word": text, "start": num, "end": num, "confidence": num}}
    segment = {"type": "object", "properties": {
        "id": {"type": "integer"}, "seq": {"type": "integer"}, "channel": {"type": "integer"}, "speaker": text,
        "start": num, "end": num, "text": text, "words": {"type": "array", "items": word},
        "speech_final": {"type": "boolean"}, "language": text, "confidence": num,
        "original_text": {**text, "description": "only on an edited segment: the recognizer's text"},
        "original_speaker": {**text, "description": "only on an edited segment"},
        "edited_at": {**num, "description": "only on an edited segment"}}}
    summary_props = {
        "id": text, "status": {"type": "string", "enum": ["live", "completed", "failed"]}, "source": _SOURCE,
        "created_at": num, "ended_at": nullable_num, "duration_s": nullable_num,
        "speakers": {"type": "array", "items": text}, "error": {"type": ["string", "null"]}}
    events = {"type": "array", "items": {"type": "string", "enum": [
        "call_started", "partial", "final", "usage", "dtmf", "call_ended"]}}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": text, "message": text,
                           "retry_after_s": {"type": "integer", "minimum": 0,
                                             "description": "on a temporary refusal: seconds until a retry may be "
                                                            "admitted (the Retry-After header says the same)"}}}}},
        "Health": {"type": "object", "required": ["status", "model", "live_sessions", "uptime_s", "disk", "sip",
                                                  "capacity", "bus"], "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded", "starting", "draining"],
                       "description": "`degraded` (with 200): up, REST works; new sessions refused for lack of "
                                      "disk (`disk`), store writes waiting for an unreachable database "
                                      "(`database`), or the shared event bus unreachable (`bus`)"},
            "model": {"type": ["string", "null"]},
            "live_sessions": {"type": "integer"}, "uptime_s": num, "disk": _ref("Disk"),
            "database": _ref("DatabaseBacklog"),
            "sip": {"oneOf": [_ref("SipOff"), _ref("SipStats")]},
            "capacity": {"oneOf": [{"type": "null"}, _ref("Capacity")]}, "bus": _ref("Bus"),
            "node_id": {"type": "string", "description": "this node's id (docs/cluster.md)"},
            "nodes": {"type": "array", "items": _ref("Node"),
                      "description": "only when other nodes share the database: every node, as this one's "
                                     "last heartbeat look saw it"}}},
        "Node": {"type": "object", "required": ["id", "url", "age_s", "state"], "properties": {
            "id": {"type": "string"}, "url": {"type": "string", "description": "its cluster.advertise_url"},
            "age_s": {"type": "number", "description": "seconds since its last heartbeat"},
            "state": {"type": "string", "enum": ["up", "draining"]}}},
        "DatabaseBacklog": {"type": "object", "description": "store writes waiting for an unreachable database, "
                            "retried in order (bridge/backlog.py)",
                            "required": ["ok", "pending_writes", "deferred_total", "oldest_s", "last_error"],
                            "properties": {"ok": {"type": "boolean"}, "pending_writes": {"type": "integer"},
                                           "deferred_total": {"type": "integer"},
                                           "oldest_s": {"type": ["number", "null"]},
                                           "last_error": {"type": ["string", "null"]}}},
        "Bus": {"type": "object", "description": "the event bus (docs/events.md): in-process, or Redis shared by "
                                                 "every node", "required": ["url", "connected", "buffered", "dropped",
                                                                            "dropped_partials"], "properties": {
            "url": {"type": "string", "description": "bus.url, password masked"},
            "connected": {"type": "boolean", "description": "false: Redis cannot be reached (status degraded)"},
            "buffered": {"type": "integer", "description": "events waiting to be sent to Redis"},
            "dropped": {"type": "integer", "description": "events given up because the buffer was full"},
            "dropped_partials": {"type": "integer", "description": "of `dropped`, partials (dropped first)"},
            "node_id": text, "sent": {"type": "integer"}, "received": {"type": "integer",
                                                                       "description": "other nodes' events"},
            "disconnects": {"type": "integer"}}},
        "Disk": {"type": "object", "description": "the data directory's free space (bridge/storage.py)",
                 "required": ["status", "free_bytes", "total_bytes", "min_free_bytes"], "properties": {
                     "status": {"type": "string", "enum": ["ok", "low", "full"],
                                "description": "low: under limits.min_free_disk_mb; full: a write failed for "
                                               "lack of space and space has not come back"},
                     "free_bytes": {"type": "integer"}, "total_bytes": {"type": "integer"},
                     "min_free_bytes": {"type": "integer", "description": "the reserve new sessions need"}}},
        "Capacity": {"type": "object", "description": "decode headroom (bridge/admission.py)", "required": [
            "legs_capacity", "legs_live", "legs_reserved", "legs_free", "admitting", "refusing"], "properties": {
            "legs_capacity": {"type": "integer"}, "legs_live": {"type": "integer"},
            "legs_per_context": {"type": "integer"},
            "cap_source": {"enum": ["max_legs", "legs_per_context", "decode speed"],
                           "description": "decode speed: the cap follows the measured decode speed"},
            "decode_s_per_audio_s": {"type": ["number", "null"],
                                     "description": "what one second of final audio costs a decode context"},
            "speed_source": {"enum": ["calibration", "finals"],
                             "description": "calibration: the clip timed at start; finals: measured over window_s"},
            "legs_reserved": {"type": "integer", "description": "held by sessions being opened"},
            "legs_free": {"type": "integer"}, "admitting": {"type": "boolean"},
            "refusing": {"type": ["string", "null"], "description": "why one more leg would be refused now"},
            "final_latency_p95_s": {"type": ["number", "null"], "description": "null: no final in the window"},
            "finals_in_window": {"type": "integer",
                                 "description": "finals the p95 is taken over; under capacity.min_finals it is not judged"},
            "oldest_final_wait_s": num, "final_utilization": num, "max_final_latency_s": num, "window_s": num}},
        "SipOff": {"type": "object", "required": ["enabled"], "properties": {
            "enabled": {"const": False},
            "unavailable": {"type": ["string", "null"],
                            "description": "why SIP is off although sip.enabled (e.g. pjsua2 cannot be imported)"}}},
        "SipStats": {"type": "object", "required": ["port", "listening", "workers"], "properties": {
            "port": {"type": "integer"}, "listening": {"type": "boolean"},
            "workers": {"type": "array", "items": {"type": "object", "properties": {
                "id": {"type": "integer"}, "port": {"type": "integer"}, "alive": {"type": "boolean"},
                "calls": {"type": "integer"}, "restarts": {"type": "integer"}}}},
            "dispatcher": {"type": "object", "description": "the SIP dispatcher's counters"}}},
        "JobSummary": {"type": "object", "properties": summary_props},
        "Job": {"type": "object", "properties": {
            **summary_props, "config": {"type": "object"}, "metadata": {"type": "object"},
            "segments": {"type": "array", "items": segment}, "transcript_path": text,
            "audio_path": {"type": ["string", "null"]}}},
        "Token": {"type": "object", "properties": {"token": text, "expires_in": {"type": "integer"},
                                                   "expires_at": num}},
        "WebRtcOffer": {"type": "object", "required": ["sdp", "type"], "properties": {
            "sdp": text, "type": {"const": "offer"},
            "config": {"type": "object", "description": "the `start` frame's fields (docs/stream-protocol.md)"}}},
        "WebRtcAnswer": {"type": "object", "required": ["sdp", "type", "job_id", "session_id",
                                                        "max_duration_seconds", "config"], "properties": {
            "sdp": text, "type": {"const": "answer"}, "job_id": text, "session_id": text,
            "max_duration_seconds": num,
            "config": {"type": "object", "description": "the effective config, as in the stream's `ready` frame"},
            "warnings": {"type": "array", "items": text,
                         "description": "only when there are any, e.g. an unknown config field ignored"}}},
        "WebhookInput": {"type": "object", "properties": {
            "url": {"type": "string", "format": "uri"}, "secret": {"type": "string", "minLength": 16, "maxLength": 256},
            "events": events, "sources": {"type": "array", "items": _SOURCE},
            "description": {"type": "string", "maxLength": 500}, "enabled": {"type": "boolean"}}},
        "Webhook": {"type": "object", "properties": {
            "id": text, "url": text, "events": events, "sources": {"type": "array", "items": _SOURCE},
            "description": text, "enabled": {"type": "boolean"}, "managed_by": {"type": ["string", "null"]},
            "secret_hint": text, "secret": {"type": "string", "description": "only when created or changed"},
            "created_at": num, "updated_at": num, "circuit": _ref("Circuit")}},
        "WebhookList": {"type": "object", "required": ["webhooks", "delivering"], "properties": {
            "webhooks": {"type": "array", "items": _ref("Webhook")},
            "delivering": {"type": "boolean", "description": "false with webhooks.enabled = false: events are "
                                                             "queued, nothing is sent"}}},
        "Circuit": {"type": "object", "description": "the endpoint's circuit breaker (in memory: closed after a "
                                                     "restart); docs/webhooks.md",
                    "required": ["state", "consecutive_failures", "retry_at"], "properties": {
                        "state": {"type": "string", "enum": ["closed", "open", "half_open"]},
                        "consecutive_failures": {"type": "integer"},
                        "retry_at": {"type": ["number", "null"], "description": "open: when the next probe may go"}}},
        "Ping": {"type": "object", "required": ["delivered", "event_id", "http_status", "error", "ms"], "properties": {
            "delivered": {"type": "boolean"}, "event_id": text, "http_status": {"type": ["integer", "null"]},
            "error": {"type": ["string", "null"]}, "ms": {"type": "integer"}}},
        "Delivery": {"type": "object", "properties": {
            "id": {"type": "integer"}, "endpoint_id": text, "job_id": text, "event_id": text,
            "seq": {"type": ["integer", "null"]}, "type": text,
            "status": {"type": "string", "enum": ["pending", "delivered", "dead"]}, "attempts": {"type": "integer"},
            "created_at": num, "next_attempt_at": nullable_num, "last_attempt_at": nullable_num,
            "last_status": {"type": ["integer", "null"]}, "last_error": {"type": ["string", "null"]},
            "delivered_at": nullable_num, "event": {"type": "object"}}},
    }


def _version() -> str:
    try:
        return metadata.version("callbridge")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once; it depends on nothing at run time)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "callbridge", "version": _version(),
                 "description": "Self-hosted telephony transcription bridge. The WebSocket protocol is "
                                "docs/stream-protocol.md; each route group has its page in docs/."},
        "security": [{"bearer": []}],
        "tags": [{"name": n} for n in ("streaming", "events", "webrtc", "jobs", "webhooks", "auth", "operations",
                                        "page")],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "An API key (`cbk_...`), a JWT, or (streams and WebRTC offers only) a temporary "
                               "token (`cbt_...`). See docs/auth.md."}},
            "headers": {"RetryAfter": {"description": "whole seconds until a retry may be admitted",
                                       "schema": {"type": "integer", "minimum": 0}}},
            "responses": {
                "Unauthorized": _error("no credential, or one that is not valid, or a temporary token where "
                                       "it is not accepted (TEMP_TOKEN_NOT_ALLOWED, not spent); docs/auth.md"),
                "AuthBackoff": {**_error("RATE_LIMITED: too many refused credentials from this address (docs/auth.md, "
                                         "\"Backoff\"); refused before the credential is looked at, with "
                                         "`retry_after_s`"),
                                "headers": {"Retry-After": {"description": "whole seconds until the block ends",
                                                            "required": True,
                                                            "schema": {"type": "integer", "minimum": 1}}}},
                "StorageFull": _error("STORAGE_FULL: the server's disk is full; retry once space is freed")},
            "schemas": _schemas(),
        },
    }


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


def add_routes(app: web.Application) -> None:
    app.router.add_get(PATH, openapi)
