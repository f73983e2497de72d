"""Drives shardgate with psycopg 3 (normal, client-side binding, prepared,
pipeline mode) and asyncpg; every check raises on a wrong answer.
Usage: clients.py DSN  -> prints 'clients ok' and exits 0."""
import asyncio
import sys

import asyncpg
import psycopg
from psycopg import errors


def psycopg_checks(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS py_t")
        conn.execute("CREATE TABLE py_t (id int PRIMARY KEY, v text)")
    # normal mode, server-side binding, explicit transactions
    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            for i in range(50):
                conn.execute("INSERT INTO py_t VALUES (%s, %s)", (i, f"v{i}"))
        assert conn.execute("SELECT count(*) FROM py_t").fetchone()[0] == 50
        conn.commit()
        # an error keeps its SQLSTATE and the session goes on
        try:
            conn.execute("SELECT * FROM no_such_table")
            raise AssertionError("expected UndefinedTable")
        except errors.UndefinedTable:
            conn.rollback()
        assert conn.execute("SELECT v FROM py_t WHERE id = %s", (7,)).fetchone()[0] == "v7"
        conn.commit()
    # client-side binding
    with psycopg.connect(dsn, cursor_factory=psycopg.ClientCursor) as conn:
        cur = conn.execute("SELECT v FROM py_t WHERE id = %s AND v = %s", (3, "v3"))
        assert cur.fetchone()[0] == "v3"
        conn.commit()
    # prepared statements, reused across many transactions
    with psycopg.connect(dsn, prepare_threshold=0) as conn:
        for i in range(200):
            row = conn.execute("SELECT v FROM py_t WHERE id = %s", (i % 50,), prepare=True).fetchone()
            assert row[0] == f"v{i % 50}", row
            conn.commit()
    # pipeline mode: many statements in flight before any result is read
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.pipeline():
            cur = conn.cursor()
            for i in range(50, 250):
                cur.execute("INSERT INTO py_t VALUES (%s, %s)", (i, f"v{i}"))
            cur.execute("SELECT count(*) FROM py_t")
        assert cur.fetchone()[0] == 250
        with conn.pipeline():
            curs = [conn.execute("SELECT v FROM py_t WHERE id = %s", (i,)) for i in range(100)]
        assert [c.fetchone()[0] for c in curs] == [f"v{i}" for i in range(100)]
        # an error in a pipeline aborts that pipeline only
        try:
            with conn.pipeline():
                conn.execute("SELECT 1/0")
                conn.execute("SELECT 1")
            raise AssertionError("expected DivisionByZero")
        except errors.DivisionByZero:
            pass
        assert conn.execute("SELECT 42").fetchone()[0] == 42


async def asyncpg_checks(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        stmt = await conn.prepare("SELECT v FROM py_t WHERE id = $1")
        for i in range(100):
            assert await stmt.fetchval(i) == f"v{i}"
        async with conn.transaction():
            await conn.executemany("INSERT INTO py_t VALUES ($1, $2)", [(i, f"a{i}") for i in range(1000, 1100)])
        assert await conn.fetchval("SELECT count(*) FROM py_t WHERE id >= 1000") == 100
        try:
            await conn.fetchval("SELECT 1/0")
            raise AssertionError("expected DivisionByZeroError")
        except asyncpg.exceptions.DivisionByZeroError:
            pass
        rows = await conn.fetch("SELECT id, v FROM py_t WHERE id < $1 ORDER BY id", 5)
        assert [(r["id"], r["v"]) for r in rows] == [(i, f"v{i}") for i in range(5)]
    finally:
        await conn.close()
    # several concurrent asyncpg connections sharing a small pool
    async def worker(n: int) -> None:
        c = await asyncpg.connect(dsn)
        try:
            for i in range(50):
                assert await c.fetchval("SELECT v FROM py_t WHERE id = $1", (n * 7 + i) % 50) == f"v{(n * 7 + i) % 50}"
        finally:
            await c.close()
    await asyncio.gather(*(worker(n) for n in range(8)))


if __name__ == "__main__":
    dsn = sys.argv[1]
    psycopg_checks(dsn)
    asyncio.run(asyncpg_checks(dsn))
    print("clients ok")
