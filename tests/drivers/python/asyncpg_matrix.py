"""asyncpg in the driver matrix: fetch, fetchrow, fetchval, prepared
statements, cursors (async for and cursor.fetch(n) inside a transaction),
executemany, execute status tags, transactions (commit, rollback, error).

usage: asyncpg_matrix.py IDS.tsv REFERENCE_DSN PROXY_DSN
"""

import asyncio
import datetime
import sys
from decimal import Decimal

import asyncpg

from matrix import ISSUE_18_ID, SEL, UTC, Matrix, acapture, blank_generated, duplicate_accepted, load_ids, proxy_error, rows_outcome, snowflake_shaped

DRIVER = "asyncpg"

# Documented refusals (0A000 with a message saying what to change): none for asyncpg.
REFUSALS = {}

# Known gaps: still run and compared; each must differ in exactly its known way.
KNOWN_GAPS = {
    "error/duplicate-id-other-merchant": duplicate_accepted(ISSUE_18_ID),
}


def sqlstate(e):
    return getattr(e, "sqlstate", None)


def recs(records, ordered=True, drop=()):
    cols = list(records[0].keys()) if records else []
    return rows_outcome(cols, [tuple(r) for r in records], ordered, drop)


def rec(record, drop=()):
    if record is None:
        return None
    return recs([record], drop=drop)


def ts(y, m, d, h=0):
    return datetime.datetime(y, m, d, h, tzinfo=UTC)


class Side:
    def __init__(self, dsn):
        self.dsn = dsn
        self.conn = None

    async def get(self):
        if self.conn is None or self.conn.is_closed():
            self.conn = await asyncpg.connect(self.dsn, command_timeout=30)
        return self.conn


async def main():
    ids = load_ids(sys.argv[1])
    ref, px = Side(sys.argv[2]), Side(sys.argv[3])
    m = Matrix(DRIVER, REFUSALS, KNOWN_GAPS)
    kinds = [k for k in ids if k != "missing"]

    async def check(name, fn, post=lambda o: o):
        want = post(await acapture(lambda: run(ref, fn), sqlstate))
        got = post(await acapture(lambda: run(px, fn), sqlstate))
        m.compare(name, want, got)
        return want

    async def cleanup(sql):
        for side in (ref, px):
            await (await side.get()).execute(sql)

    async def run(side, fn):
        return await fn(await side.get())

    # ---- fetch
    await check("fetch/merchant-scan", lambda c: fetch(c, f"{SEL} WHERE merchant_id = $1 ORDER BY id", 7))
    want = await check("fetch/all-ordered-by-id", lambda c: fetch(c, f"{SEL} ORDER BY id"))
    m.expect("fetch/all-ordered-by-id reference has every row", want[0] == "rows" and len(want[2]) == 400, want[:2])
    for kind in kinds + ["missing"]:
        await check(f"fetch/by-id/{kind}", lambda c, k=kind: seq(c, [lambda c, i=i: fetch(c, f"{SEL} WHERE id = $1", i) for i in ids[k]]))
    every = [i for k in kinds for i in ids[k]]
    await check("fetch/id-any-array", lambda c: fetch(c, f"{SEL} WHERE id = ANY($1::bigint[]) ORDER BY id", every))
    await check("fetch/id-in-literals", lambda c: fetch(c, f"{SEL} WHERE id IN ({', '.join(map(str, every))}) ORDER BY id"))
    await check(
        "fetch/group-by",
        lambda c: fetch(c, "SELECT merchant_id, count(*), sum(order_amount), avg(order_amount) FROM t_order WHERE merchant_id <= $1 GROUP BY 1 ORDER BY 1", 10),
    )
    await check("fetch/time-range", lambda c: fetch(c, f"{SEL} WHERE create_time >= $1 AND create_time < $2 ORDER BY create_time, id", ts(2026, 7, 1), ts(2026, 9, 1)))

    # ---- fetchrow (asyncpg asks for one row: Execute with a row limit of 1)
    for kind in kinds + ["missing"]:
        await check(f"fetchrow/by-id/{kind}", lambda c, k=kind: seq(c, [lambda c, i=i: rec_of(c.fetchrow(f"{SEL} WHERE id = $1", i)) for i in ids[k]]))
    await check("fetchrow/aggregate", lambda c: rec_of(c.fetchrow("SELECT count(*), min(create_time), max(order_amount) FROM t_order WHERE merchant_id = $1", 3)))
    await check("fetchrow/first-of-many", lambda c: rec_of(c.fetchrow(f"{SEL} WHERE merchant_id = $1 ORDER BY create_time, id", 9)))
    await check("fetchrow/multi-shard-order-limit", lambda c: rec_of(c.fetchrow(f"{SEL} ORDER BY order_amount DESC NULLS LAST, id LIMIT 1")))

    # ---- fetchval
    for kind in kinds + ["missing"]:
        await check(f"fetchval/by-id/{kind}", lambda c, k=kind: seq(c, [lambda c, i=i: c.fetchval("SELECT order_no FROM t_order WHERE id = $1", i) for i in ids[k]]))
    await check("fetchval/count-since", lambda c: c.fetchval("SELECT count(*) FROM t_order WHERE create_time >= $1", ts(2026, 9, 1)))
    await check("fetchval/sum-merchant", lambda c: c.fetchval("SELECT sum(order_amount) FROM t_order WHERE merchant_id = $1", 11))

    # ---- prepared statement, reused for every kind
    async def prepared(c):
        st = await c.prepare(f"{SEL} WHERE id = $1")
        names = tuple(a.name for a in st.get_attributes())
        out = [names]
        for k in kinds + ["missing"]:
            for i in ids[k]:
                out.append(rec(await st.fetchrow(i)))
        out.append(recs(await st.fetch(ids["small"][0])))
        return tuple(out)

    await check("prepare/fetchrow-every-kind", prepared)

    async def prepared_fetch(c):
        st = await c.prepare(f"{SEL} WHERE id = $1")
        return tuple([recs(await st.fetch(i)) for k in kinds + ["missing"] for i in ids[k]])

    await check("prepare/fetch-every-kind", prepared_fetch)

    # ---- cursors (need a transaction)
    async def cursor_async_for(c):
        async with c.transaction():
            return recs([r async for r in c.cursor(f"{SEL} ORDER BY id")])

    async def cursor_prefetch(c):
        async with c.transaction():
            return recs([r async for r in c.cursor(f"{SEL} WHERE merchant_id = ANY($1::bigint[]) ORDER BY id", [1, 2, 3, 12], prefetch=7)])

    async def cursor_fetch_n(c):
        async with c.transaction():
            cur = await c.cursor(f"{SEL} ORDER BY create_time, id")
            a = recs(await cur.fetch(5))
            b = rec(await cur.fetchrow())
            moved = await cur.forward(10)
            d = recs(await cur.fetch(300))
            e = recs(await cur.fetch(300))
            return (a, b, moved, d, e)

    async def cursor_param(c):
        async with c.transaction():
            cur = await c.cursor(f"{SEL} WHERE merchant_id = $1 ORDER BY id", 5)
            return (recs(await cur.fetch(3)), recs(await cur.fetch(100)))

    await check("cursor/async-for-all-rows", cursor_async_for)
    await check("cursor/async-for-prefetch-7", cursor_prefetch)
    await check("cursor/fetch-n-forward", cursor_fetch_n)
    await check("cursor/fetch-n-one-merchant", cursor_param)

    # ---- executemany: explicit ids of every kind, one statement per row
    new_rows = [
        (9100002, "AP-1", 21, Decimal("5.00"), "NEW", ts(2026, 11, 20, 1)),
        (40004858, "AP-2", 22, Decimal("6.10"), "NEW", ts(2026, 10, 20, 1)),
        (70001, "AP-3", 23, Decimal("7.50"), "PAID", ts(2026, 9, 21, 1)),
        ((1 << 22) + 7777, "AP-4", 24, None, "NEW", ts(2026, 8, 22, 1)),
        (1_500_000_000_000, "AP-5", 25, Decimal("9.99"), None, ts(2026, 7, 23, 1)),
        (snowflake_shaped(6, 99), "AP-6", 26, Decimal("1.01"), "NEW", ts(2026, 6, 24, 1)),
        (-70001, "AP-7", 27, Decimal("2.02"), "NEW", ts(2026, 11, 1, 1)),
    ]
    insert = "INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time) VALUES ($1, $2, $3, $4, $5, $6)"

    async def executemany_insert(c):
        r = await c.executemany(insert, new_rows)
        look = [await fetch(c, f"{SEL} WHERE id = $1", row[0]) for row in new_rows]
        return (r, look, recs(await c.fetch(f"{SEL} WHERE order_no LIKE 'AP-%' ORDER BY order_no")))

    await check("executemany/insert-explicit-ids", executemany_insert)

    updated = [i for k in kinds for i in ids[k][:2]]

    async def executemany_update(c):
        await c.executemany("UPDATE t_order SET pay_status = $2 WHERE id = $1", [(i, "EM") for i in updated])
        return recs(await c.fetch(f"{SEL} WHERE pay_status = 'EM' ORDER BY id"))

    await check("executemany/update-by-id", executemany_update)

    async def executemany_atomic(c):
        rows = [
            (60000001, "EMA-1", 31, Decimal("1.00"), "NEW", ts(2026, 10, 2)),
            (60000002, "EMA-2", 32, Decimal("1e17"), "NEW", ts(2026, 10, 3)),  # numeric(18,2) overflow: 22003
            (60000003, "EMA-3", 33, Decimal("1.00"), "NEW", ts(2026, 10, 4)),
        ]
        try:
            await c.executemany(insert, rows)
            err = None
        except asyncpg.PostgresError as e:
            err = e.sqlstate
        # one table: executemany is one implicit transaction, nothing of it stays
        return (err, recs(await c.fetch(f"{SEL} WHERE order_no LIKE 'EMA-%' ORDER BY id")))

    await check("executemany/atomic-on-error", executemany_atomic)
    await cleanup("DELETE FROM t_order WHERE order_no LIKE 'EMA-%'")

    # ---- execute: status tags of UPDATE/DELETE by id
    async def update_tags(c):
        out = []
        for k in kinds + ["missing"]:
            for i in ids[k][:2]:
                out.append(await c.execute("UPDATE t_order SET order_amount = order_amount + 1 WHERE id = $1", i))
        return tuple(out)

    await check("execute/update-by-id-tags", update_tags)
    await check("execute/after-update-by-id", lambda c: fetch(c, f"{SEL} WHERE id = ANY($1::bigint[]) ORDER BY id", [i for k in kinds for i in ids[k][:2]]))

    async def delete_tags(c):
        out = []
        for k in kinds + ["missing"]:
            i = ids[k][-1]
            out.append(await c.execute("DELETE FROM t_order WHERE id = $1", i))
            out.append(await val(c, "SELECT count(*) FROM t_order WHERE id = $1", i))
        out.append(await val(c, "SELECT count(*) FROM t_order WHERE id = ANY($1::bigint[])", [i for k in kinds for i in ids[k]]))
        return tuple(out)

    await check("execute/delete-by-id-tags", delete_tags)

    # ---- generated ids (INSERT without id): compared without the id
    async def generated(c):
        r = (await c.fetch(
            "INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status, create_time) VALUES ($1, $2, $3, $4, $5) RETURNING *",
            "GEN-A1", 13, Decimal("12.34"), "NEW", ts(2026, 11, 3, 4),
        ))[0]
        back = await fetch(c, f"{SEL} WHERE id = $1", r["id"])
        no = await val(c, "SELECT order_no FROM t_order WHERE id = $1", r["id"])
        tag = await c.execute("UPDATE t_order SET pay_status = 'PAID' WHERE id = $1", r["id"])
        return (rec(r, drop=("id",)), strip_id(back), no, tag)

    await check("fetch/insert-generated-id-returning", generated)

    # ---- transactions
    async def tx_commit(c):
        async with c.transaction():
            a = await c.execute("UPDATE t_order SET pay_status = 'TXC' WHERE merchant_id = $1", 14)
            b = await c.execute("DELETE FROM t_order WHERE id = $1", ids["mid"][1])
            n = await val(c, "SELECT count(*) FROM t_order WHERE pay_status = 'TXC'")
        return (a, b, n, recs(await c.fetch(f"{SEL} WHERE merchant_id = $1 OR id = $2 ORDER BY id", 14, ids["mid"][1])))

    await check("transaction/commit", tx_commit)

    async def tx_rollback(c):
        stats = "SELECT merchant_id, count(*), sum(order_amount) FROM t_order WHERE merchant_id IN ($1, $2) GROUP BY 1 ORDER BY 1"
        large = ids["large"][0]
        before = (await fetch(c, stats, 15, 18), await val(c, "SELECT order_amount FROM t_order WHERE id = $1", large))
        tr = c.transaction()
        await tr.start()
        a = await c.execute("DELETE FROM t_order WHERE merchant_id = $1", 15)
        b = await c.execute("UPDATE t_order SET order_amount = 0 WHERE merchant_id = $1", 18)
        d = await c.execute("UPDATE t_order SET order_amount = 0 WHERE id = $1", large)
        inside = (await fetch(c, stats, 15, 18), await val(c, "SELECT order_amount FROM t_order WHERE id = $1", large))
        await tr.rollback()
        after = (await fetch(c, stats, 15, 18), await val(c, "SELECT order_amount FROM t_order WHERE id = $1", large))
        return (before, a, b, d, inside, after)

    await check("transaction/rollback", tx_rollback)

    async def tx_error(c):
        try:
            async with c.transaction():
                await c.execute("UPDATE t_order SET pay_status = 'TXE' WHERE merchant_id = $1", 16)
                await c.execute(insert, 60000010, "TXE-1", 16, Decimal("1e17"), None, ts(2026, 9, 9))  # numeric(18,2) overflow: 22003
            err = None
        except asyncpg.PostgresError as e:
            err = e.sqlstate
        return (err, await val(c, "SELECT count(*) FROM t_order WHERE pay_status = 'TXE'"))

    await check("transaction/error-rolls-back", tx_error)

    # ---- errors keep their SQLSTATE
    await check("error/undefined-column", lambda c: fetch(c, "SELECT nocol FROM t_order WHERE merchant_id = $1", 1))
    await check("error/division-by-zero", lambda c: fetch(c, "SELECT order_amount / 0 FROM t_order WHERE merchant_id = $1 AND order_amount IS NOT NULL", 5))
    # one table: id is the primary key and order_no is unique over the whole table (README, "Sharded execution")
    await check("error/duplicate-order-no-same-merchant-and-month", lambda c: c.execute(insert, 60000020, "S00040", 1, None, None, ts(2026, 10, 17)))
    await check("error/duplicate-order-no-other-merchant", lambda c: c.execute(insert, 60000021, "S00041", 2, None, None, ts(2026, 10, 17)))
    await check("error/duplicate-id-other-merchant", lambda c: c.execute(insert, ids["small"][0], "DUP-1", 2, None, None, ts(2026, 9, 1)))
    # what those left behind (when they did not fail: the known gaps) is not compared again below
    await cleanup("DELETE FROM t_order WHERE id IN (60000020, 60000021) OR order_no = 'DUP-1'")

    # ---- the whole table at the end
    await check("final/table", lambda c: fetch(c, f"{SEL} ORDER BY order_no"), post=blank_generated)

    for s in (ref, px):
        if s.conn is not None and not s.conn.is_closed():
            await s.conn.close()
    m.finish()


async def fetch(c, sql, *args):
    return recs(await c.fetch(sql, *args))


async def val(c, sql, *args):
    """The first value of the first row, read with fetch (no row limit)."""
    rows = await c.fetch(sql, *args)
    return rows[0][0] if rows else None


def strip_id(outcome):
    if outcome[0] != "rows":
        return outcome
    i = outcome[1].index("id")
    return ("rows", outcome[1][:i] + outcome[1][i + 1:], tuple(r[:i] + r[i + 1:] for r in outcome[2]))


async def rec_of(coro):
    return rec(await coro)


async def seq(c, fns):
    out = []
    for f in fns:
        r = f(c)
        out.append(await r if asyncio.iscoroutine(r) else r)
    return tuple(out)


if __name__ == "__main__":
    asyncio.run(main())
