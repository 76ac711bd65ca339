"""Storage backends by URL scheme: `storage.url` picks one; empty means the embedded SQLite file.

Adding a backend: its module (`open_stores`, `schema_status` and `migrate` coroutines,
bridge/stores/backend.py), one line in _MODULES here, and its scheme in
bridge.config.STORE_SCHEMES (the config layer refuses unknown schemes before anything starts; a
test keeps the two lists equal).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

from bridge.config import Config, ConfigError
from bridge.stores import postgres, sqlite
from bridge.stores.backend import Opener, Stores
from bridge.stores.migrations import Migration, SchemaStatus

__all__ = ["BACKENDS", "DB_NAME", "migrate", "open_stores", "schema_status", "scheme_of", "store_url"]

DB_NAME = "callbridge.db"  # the default database file in data_dir

_MODULES: dict[str, ModuleType] = {
    sqlite.SCHEME: sqlite,
    **{scheme: postgres for scheme in postgres.SCHEMES},
}
BACKENDS: dict[str, Opener] = {scheme: module.open_stores for scheme, module in _MODULES.items()}

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def store_url(config: Config) -> str:
    """`storage.url`, or the SQLite file in data_dir where the service has always kept its data."""
    return config.storage.url or sqlite.url_for(Path(config.server.data_dir).resolve() / DB_NAME)


def scheme_of(url: str) -> str:
    m = _SCHEME.match(url)
    if m is None:
        raise ConfigError(f"storage.url must look like SCHEME://..., e.g. sqlite:///var/lib/callbridge/{DB_NAME}")
    return m.group(1).lower()


def _backend(url: str) -> ModuleType:
    """The module for `url`'s scheme; an unknown scheme is a ConfigError listing the known ones."""
    scheme = scheme_of(url)
    if scheme not in _MODULES:
        raise ConfigError(f"storage.url: unknown scheme {scheme!r}; known: {', '.join(sorted(_MODULES))}")
    return _MODULES[scheme]


async def open_stores(url: str, *, create: bool = True, migrate: bool = True) -> Stores:
    """Open the backend `url` names, its schema migrated first (bridge/stores/migrations.py).
    `create=False` raises StoreNotFound instead of starting an empty database; `migrate=False`
    raises SchemaOutdated instead of upgrading one that is behind this code."""
    return await _backend(url).open_stores(url, create=create, migrate=migrate)


async def schema_status(url: str) -> SchemaStatus:
    """Where the schema stands (read-only); StoreNotFound when there is no database."""
    return await _backend(url).schema_status(url)


async def migrate(url: str) -> list[Migration]:
    """Apply the pending migrations (an empty database gets all); returns what this call applied."""
    return await _backend(url).migrate(url)
