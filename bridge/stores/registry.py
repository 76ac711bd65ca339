"""Storage backends by URL scheme: `storage.url` picks one; empty means the embedded SQLite file.

Adding a backend: its module (an `open_stores(url, *, create)` coroutine, bridge/stores/backend.py),
one line in BACKENDS here, and its scheme in bridge.config.STORE_SCHEMES (the config layer refuses
unknown schemes before anything starts; a test keeps the two lists equal).
"""

from __future__ import annotations

import re
from pathlib import Path

from bridge.config import Config, ConfigError
from bridge.stores import postgres, sqlite
from bridge.stores.backend import Opener, Stores

__all__ = ["BACKENDS", "DB_NAME", "open_stores", "scheme_of", "store_url"]

DB_NAME = "callbridge.db"  # the default database file in data_dir

BACKENDS: dict[str, Opener] = {
    sqlite.SCHEME: sqlite.open_stores,
    **{scheme: postgres.open_stores for scheme in postgres.SCHEMES},
}

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def store_url(config: Config) -> str:
    """`storage.url`, or the SQLite file in data_dir where the service has always kept its data."""
    return config.storage.url or sqlite.url_for(Path(config.server.data_dir).resolve() / DB_NAME)


def scheme_of(url: str) -> str:
    m = _SCHEME.match(url)
    if m is None:
        raise ConfigError(f"storage.url must look like SCHEME://..., e.g. sqlite:///var/lib/callbridge/{DB_NAME}")
    return m.group(1).lower()


async def open_stores(url: str, *, create: bool = True) -> Stores:
    """Open the backend `url` names. An unknown scheme is a ConfigError listing the known ones;
    `create=False` raises StoreNotFound instead of starting an empty database."""
    scheme = scheme_of(url)
    opener = BACKENDS.get(scheme)
    if opener is None:
        raise ConfigError(f"storage.url: unknown scheme {scheme!r}; known: {', '.join(sorted(BACKENDS))}")
    return await opener(url, create=create)
