"""Versioned schema migrations, the part every backend shares: what a migration is, what state a
database's schema is in, and the rule for opening one that is behind or ahead of this code.

Each backend lists its own migrations (its SQL dialect) in `bridge/stores/<backend>/migrations.py`
and applies them with its own runner; the list is the only place a backend's schema is defined.
Versions are 1, 2, 3, ... with the same number and name in every backend (a test keeps them equal),
so `callbridge db status` reads the same whichever database is behind the URL.

The `schema_version` table has one row per applied migration: (version, name, applied_at). A
database made before migrations had names (the release at commit 8497f87, "version 1") has a table
with only `version`; it is read as is and given the two columns by the first migration applied to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.stores.backend import StoreNotFound, StoreUnavailable

__all__ = ["Applied", "Migration", "SchemaOutdated", "SchemaStatus", "SchemaTooNew", "check_sequence",
           "to_apply", "status_of"]


@dataclass(frozen=True)
class Migration:
    """One step of the schema. `sql` is statements separated by `;` (none inside a literal), run in
    one transaction with the row that records it, so a migration is applied wholly or not at all."""

    version: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        return [s.strip() for s in self.sql.split(";") if s.strip()]


@dataclass(frozen=True)
class Applied:
    """A row of `schema_version`. `applied_at` is None for the row a pre-migration release wrote."""

    version: int
    name: str
    applied_at: float | None


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database's schema stands against this code's migrations."""

    backend: str  # "sqlite", "postgresql"
    where: str  # a path, or host:port/dbname (never a password)
    applied: tuple[Applied, ...]
    pending: tuple[Migration, ...]
    latest: int  # the newest version this code knows

    @property
    def current(self) -> int:
        """The database's version; 0 when it holds no callbridge schema."""
        return max((a.version for a in self.applied), default=0)

    @property
    def too_new(self) -> bool:
        return self.current > self.latest

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "where": self.where, "version": self.current, "latest": self.latest,
                "up_to_date": self.current == self.latest,
                "applied": [{"version": a.version, "name": a.name, "applied_at": a.applied_at} for a in self.applied],
                "pending": [{"version": m.version, "name": m.name} for m in self.pending]}


class SchemaTooNew(StoreUnavailable):
    """The database was migrated by a newer release: this code must not read or write it (it
    would not know the new columns' rules), so it refuses before touching any table."""

    def __init__(self, where: str, current: int, latest: int) -> None:
        super().__init__(where, f"database schema v{current} is newer than this code (v{latest})")
        self.current, self.latest = current, latest


class SchemaOutdated(StoreUnavailable):
    """The database needs migrations and the opener was told not to apply them (a CLI command
    other than `serve` and `db migrate`): the operator decides when a shared schema changes."""

    def __init__(self, where: str, current: int, pending: Sequence[Migration]) -> None:
        names = ", ".join(f"{m.version} {m.name}" for m in pending)
        super().__init__(where, f"database schema v{current} is older than this code "
                                f"(v{pending[-1].version}; pending: {names})")
        self.current, self.pending = current, tuple(pending)


def check_sequence(migrations: Sequence[Migration]) -> tuple[Migration, ...]:
    """A backend's list, checked at import: versions 1..n in order, names set."""
    for i, m in enumerate(migrations, 1):
        if m.version != i or not m.name:
            raise AssertionError(f"migration #{i} is {m.version} {m.name!r}: versions must run 1, 2, 3, ...")
    return tuple(migrations)


def status_of(backend: str, where: str, rows: Sequence[Mapping[str, Any]],
              migrations: Sequence[Migration]) -> SchemaStatus:
    """The status from `schema_version`'s rows (any columns: a pre-migration table has only
    `version`, whose name is then taken from this code's list)."""
    names = {m.version: m.name for m in migrations}
    applied = tuple(sorted((Applied(int(r["version"]), r.get("name") or names.get(int(r["version"]), "?"),
                                    r.get("applied_at")) for r in rows), key=lambda a: a.version))
    current = max((a.version for a in applied), default=0)
    return SchemaStatus(backend=backend, where=where, applied=applied,
                        pending=tuple(m for m in migrations if m.version > current), latest=migrations[-1].version)


def to_apply(status: SchemaStatus, *, create: bool, migrate: bool) -> tuple[Migration, ...]:
    """What an opener may apply, or why it must not open at all.

    `create`: an empty database (no schema) may be given every migration; without it, it is
    StoreNotFound (a CLI pointed at the wrong place must not start an empty database).
    `migrate`: a database behind this code may be upgraded; without it, SchemaOutdated.
    A database ahead of this code is always SchemaTooNew."""
    if status.too_new:
        raise SchemaTooNew(status.where, status.current, status.latest)
    if status.current == 0 and not create:
        raise StoreNotFound(status.where)
    if status.current > 0 and status.pending and not migrate:
        raise SchemaOutdated(status.where, status.current, status.pending)
    return status.pending
