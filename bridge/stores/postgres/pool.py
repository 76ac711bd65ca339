"""The connection pool the three PostgreSQL stores of one opening share.

Each store method takes a connection and runs as one transaction on it (`Pool.tx`), so its
check and write never interleave with another connection's, in this process or another node.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from psycopg_pool import AsyncConnectionPool

__all__ = ["Pool"]


class Pool:
    """The pool the three stores share; closed when the last of them closes."""

    def __init__(self, pool: AsyncConnectionPool, users: int) -> None:
        self._pool = pool
        self._users = users

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """A pooled connection inside one transaction: committed at the end, rolled back on error."""
        async with self._pool.connection() as conn, conn.transaction():
            yield conn

    async def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            await self._pool.close()
