"""`GET /openapi.json`: an OpenAPI 3.1 description of every HTTP route the service registers.

Written by hand, next to the routes rather than generated from them, so that it says what each
route means; tests/test_openapi.py keeps it honest by comparing its paths and methods with the
routes of the real app (both ways) and validating it against the OpenAPI 3.1 schema. WebSocket
routes are described as the GET that upgrades (101); their frames are docs/stream-protocol.md's.
Every GET also answers HEAD (aiohttp's default); HEAD is not listed. No credential is needed to
read it, as with /healthz.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata
from typing import Any

from aiohttp import web

__all__ = ["PATH", "add_routes", "document"]

PATH = "/openapi.json"

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_AUTH_ERRORS = {"401": {"$ref": "#/components/responses/Unauthorized"}}
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
_SOURCE = {"type": "string", "enum": ["stream", "sip", "webrtc"]}


def _websocket(summary: str, description: str, params: list[dict[str, Any]], tag: str) -> dict[str, Any]:
    return {"get": {
        "summary": summary, "tags": [tag], "description": description + " Frames: docs/stream-protocol.md.",
        "parameters": params,
        "responses": {"101": {"description": "Switching Protocols: the WebSocket is open"},
                      **_AUTH_ERRORS, "503": _error("the server is starting or shutting down")}}}


def _paths() -> dict[str, Any]:
    return {
        "/healthz": {"get": {
            "summary": "liveness and readiness", "tags": ["operations"], "security": [],
            "responses": {"200": _json(_ref("Health"), "ready: the model is loaded (and SIP listening when on)"),
                          "503": _json(_ref("Health"), "starting or draining")}}},
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
             _param("token", "query", "temporary token (`cbt_...`) or JWT")], "streaming"),
        "/v1/events": _websocket(
            "live events of every job of the caller's key (dashboards)",
            "Sends only; see docs/events.md.",
            [_param("source", "query", "comma-separated sources to follow (default all)"),
             _param("types", "query", "comma-separated event types to send (default all)")], "events"),
        "/v1/calls/{job_id}/events": _websocket(
            "live events of one job, after a catch-up of its finals so far",
            "Sends only; see docs/events.md.",
            [_JOB_ID, _param("after", "query", "resume after this seq", {"type": "integer"})], "events"),
        "/v1/webrtc/offer": {"post": {
            "summary": "WebRTC signaling: an SDP offer in, the answer and the job id out", "tags": ["webrtc"],
            "description": "See docs/webrtc.md. A temporary token is spent only by an offer that is accepted.",
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("WebRtcOffer")}}},
            "responses": {"200": _json(_ref("WebRtcAnswer"), "the SDP answer"),
                          "400": _error("INVALID_CONFIG: a bad offer or config"), **_AUTH_ERRORS,
                          "402": _error("INSUFFICIENT_CREDITS"), "404": _error("WebRTC is disabled"),
                          "429": _error("RATE_LIMITED: too many sessions for this key"),
                          "503": _error("the server is starting or shutting down")}}},
        "/v1/tokens": {"post": {
            "summary": "mint a single-use temporary token that opens one stream", "tags": ["auth"],
            "description": "With an API key only (not a JWT or another token). See docs/auth.md.",
            "requestBody": {"required": False, "content": {JSON: {"schema": {
                "type": "object", "properties": {"expires_in": {"type": "integer", "minimum": 60,
                                                                "maximum": 360000, "default": 60}}}}}},
            "responses": {"201": _json(_ref("Token"), "the token (not stored in any cache)"), **_BAD,
                          **_AUTH_ERRORS, "403": _error("FORBIDDEN: not minted with an API key")}}},
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
                                    **_NOT_FOUND, "409": _error("JOB_LIVE: the job has not ended")}},
            "delete": {"summary": "delete the job, its transcript and its audio", "tags": ["jobs"],
                       "parameters": [_JOB_ID],
                       "responses": {"204": {"description": "deleted"}, **_AUTH_ERRORS, **_NOT_FOUND,
                                     "409": _error("JOB_LIVE: the job has not ended")}}},
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
                                   **_BAD, **_AUTH_ERRORS, "409": _error("TOO_MANY_WEBHOOKS")}},
            "get": {"summary": "this key's webhook endpoints", "tags": ["webhooks"],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "webhooks": {"type": "array", "items": _ref("Webhook")}}}, "the endpoints"),
                        **_AUTH_ERRORS}}},
        "/v1/webhooks/{webhook_id}": {
            "get": {"summary": "one endpoint", "tags": ["webhooks"], "parameters": [_WEBHOOK_ID],
                    "responses": {"200": _json(_ref("Webhook"), "the endpoint"), **_AUTH_ERRORS, **_NOT_FOUND}},
            "patch": {"summary": "change an endpoint", "tags": ["webhooks"], "parameters": [_WEBHOOK_ID],
                      "requestBody": {"required": True, "content": {JSON: {"schema": _ref("WebhookInput")}}},
                      "responses": {"200": _json(_ref("Webhook"), "the endpoint"), **_BAD, **_AUTH_ERRORS,
                                    **_NOT_FOUND, "409": _error("MANAGED_BY_CONFIG: an operator endpoint")}},
            "delete": {"summary": "delete an endpoint and its delivery log", "tags": ["webhooks"],
                       "parameters": [_WEBHOOK_ID],
                       "responses": {"204": {"description": "deleted"}, **_AUTH_ERRORS, **_NOT_FOUND,
                                     "409": _error("MANAGED_BY_CONFIG: an operator endpoint")}}},
        "/v1/webhooks/{webhook_id}/test": {"post": {
            "summary": "send a signed ping now", "tags": ["webhooks"], "parameters": [_WEBHOOK_ID],
            "responses": {"200": _json({"type": "object"}, "the attempt's outcome"), **_AUTH_ERRORS, **_NOT_FOUND}}},
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
                                       "queued"), **_AUTH_ERRORS, **_NOT_FOUND}}},
        "/v1/webhooks/{webhook_id}/redeliver": {"post": {
            "summary": "every dead delivery back to pending, waiting ones retried now", "tags": ["webhooks"],
            "parameters": [_WEBHOOK_ID],
            "responses": {"202": _json({"type": "object", "properties": {"redelivered": {"type": "integer"},
                                                                         "retried_now": {"type": "integer"}}},
                                       "queued"), **_AUTH_ERRORS, **_NOT_FOUND}}},
    }


def _schemas() -> dict[str, Any]:
    num, text, nullable_num = {"type": "number"}, {"type": "string"}, {"type": ["number", "null"]}
    word = {"type": "object", "properties": {"word": text, "start": num, "end": num, "confidence": num}}
    segment = {"type": "object", "properties": {
        "id": {"type": "integer"}, "seq": {"type": "integer"}, "channel": {"type": "integer"}, "speaker": text,
        "start": num, "end": num, "text": text, "words": {"type": "array", "items": word},
        "speech_final": {"type": "boolean"}, "language": text, "confidence": num}}
    summary_props = {
        "id": text, "status": {"type": "string", "enum": ["live", "completed", "failed"]}, "source": _SOURCE,
        "created_at": num, "ended_at": nullable_num, "duration_s": nullable_num,
        "speakers": {"type": "array", "items": text}, "error": {"type": ["string", "null"]}}
    events = {"type": "array", "items": {"type": "string", "enum": [
        "call_started", "partial", "final", "usage", "dtmf", "call_ended"]}}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": text, "message": text}}}},
        "Health": {"type": "object", "properties": {
            "status": {"type": "string", "enum": ["ok", "starting", "draining"]}, "model": {"type": ["string", "null"]},
            "live_sessions": {"type": "integer"}, "uptime_s": num, "sip": {"type": "object"}}},
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
        "WebRtcAnswer": {"type": "object", "properties": {"sdp": text, "type": {"const": "answer"}, "job_id": text}},
        "WebhookInput": {"type": "object", "properties": {
            "url": {"type": "string", "format": "uri"}, "secret": {"type": "string", "minLength": 16, "maxLength": 256},
            "events": events, "sources": {"type": "array", "items": _SOURCE},
            "description": {"type": "string", "maxLength": 500}, "enabled": {"type": "boolean"}}},
        "Webhook": {"type": "object", "properties": {
            "id": text, "url": text, "events": events, "sources": {"type": "array", "items": _SOURCE},
            "description": text, "enabled": {"type": "boolean"}, "managed_by": {"type": ["string", "null"]},
            "secret_hint": text, "secret": {"type": "string", "description": "only when created or changed"},
            "created_at": num, "updated_at": num}},
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
            "responses": {"Unauthorized": _error("no credential, or one that is not valid (docs/auth.md)")},
            "schemas": _schemas(),
        },
    }


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


def add_routes(app: web.Application) -> None:
    app.router.add_get(PATH, openapi)
