"""The three calls of a database connection the payment and alert stores make.

aiosqlite's connection has them; store/pg_connection.py gives asyncpg the same shape (with
`?` placeholders numbered), so one statement text serves both engines where SQL agrees.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol


class SqlConnection(Protocol):
    async def execute(self, sql: str, parameters: Iterable[Any] = (), /) -> Any: ...

    async def execute_fetchall(self, sql: str, parameters: Iterable[Any] = (), /) -> Iterable[Any]: ...

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]], /) -> Any: ...
