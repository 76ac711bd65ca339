"""Persistence behind interfaces: the job store, the key/credit/token store and the webhook store.

The interfaces (typing.Protocol, async) are in jobs.py, keys.py and webhooks.py; a backend
(bridge/stores/sqlite/ is the embedded default) implements all three and is chosen by the
`storage.url` setting through registry.py. Nothing outside this package opens a database.
"""

from bridge.stores.backend import StoreNotFound, Stores, StoreUnavailable
from bridge.stores.jobs import JobStore
from bridge.stores.keys import ApiKey, InsufficientCredits, KeyNotFound, KeyStore, TokenRefused
from bridge.stores.migrations import Migration, SchemaOutdated, SchemaStatus, SchemaTooNew
from bridge.stores.registry import BACKENDS, DB_NAME, migrate, open_stores, schema_status, scheme_of, store_url
from bridge.stores.webhooks import NewDelivery, WebhookStore

__all__ = [
    "BACKENDS",
    "DB_NAME",
    "ApiKey",
    "InsufficientCredits",
    "JobStore",
    "KeyNotFound",
    "KeyStore",
    "Migration",
    "NewDelivery",
    "SchemaOutdated",
    "SchemaStatus",
    "SchemaTooNew",
    "StoreNotFound",
    "StoreUnavailable",
    "Stores",
    "TokenRefused",
    "WebhookStore",
    "migrate",
    "open_stores",
    "schema_status",
    "scheme_of",
    "store_url",
]
