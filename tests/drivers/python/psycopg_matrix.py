"""psycopg 3 in the driver matrix, in four modes: server-side binding (the
default cursor), client-side binding (ClientCursor), prepared statements
(prepare=True) and pipeline mode; then named server-side cursors
(DECLARE/FETCH: itersize, fetchmany, scroll, WITH HOLD).

usage: psycopg_matrix.py IDS.tsv REFERENCE_DSN PROXY_DSN
"""

import datetime
import sys
from decimal import Decimal

import psycopg

from matrix import SEL, UTC, Matrix, blank_generated, capture, load_ids, rows_outcome, snowflake_shaped

DRIVER = "psycopg"

# Documented refusals: shardgate answers DECLARE ... CURSOR on t_order with 0A000 and a
# message saying what to change (DECLARE/FETCH through shardgate is not implemented yet).
DECLARE_REFUSED = "DECLARE ... CURSOR on the sharded t_order is refused with 0A000"
REFUSALS = {
    "named-cursor/itersize-50-all-rows": DECLARE_REFUSED,
    "named-cursor/fetchmany-fetchone-fetchall": DECLARE_REFUSED,
    "named-cursor/scrollable": DECLARE_REFUSED,
    "named-cursor/withhold-autocommit": DECLARE_REFUSED,
}

# Known gaps: none for psycopg.
KNOWN_GAPS = {}
MODES = ("server", "client", "prepared", "pipeline")
INSERT = "INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time) VALUES (%s, %s, %s, %s, %s, %s)"


def sqlstate(e):
    return getattr(e, "sqlstate", None)


def ts(y, m, d, h=0):
    return datetime.datetime(y, m, d, h, tzinfo=UTC)


def result(cur, drop=()):
    if cur.description is None:
        return ("count", cur.rowcount)
    return rows_outcome([d.name for d in cur.description], cur.fetchall(), drop=drop) + (cur.rowcount,)


def q(conn, mode, sql, params=(), drop=()):
    """One statement run the way `mode` runs it."""
    cur = psycopg.ClientCursor(conn) if mode == "client" else conn.cursor()
    if mode == "pipeline":
        with conn.pipeline():
            cur.execute(sql, params)
    elif mode == "prepared":
        cur.execute(sql, params, prepare=True)
    else:
        cur.execute(sql, params)
    return result(cur, drop)


class Side:
    def __init__(self, dsn):
        self.dsn = dsn
        self.conn = None

    def get(self):
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        return self.conn


def main():
    ids = load_ids(sys.argv[1])
    ref, px = Side(sys.argv[2]), Side(sys.argv[3])
    m = Matrix(DRIVER, REFUSALS, KNOWN_GAPS)
    kinds = [k for k in ids if k != "missing"]

    def check(name, fn, post=lambda o: o):
        want = post(capture(lambda: fn(ref.get()), sqlstate))
        got = post(capture(lambda: fn(px.get()), sqlstate))
        m.compare(name, want, got)
        return want

    for n, mode in enumerate(MODES):
        # reads: point lookups by every kind of id, scans, merges
        for kind in kinds + ["missing"]:
            check(f"{mode}/by-id/{kind}", lambda c, k=kind: tuple(q(c, mode, f"{SEL} WHERE id = %s", (i,)) for i in ids[k]))
        check(f"{mode}/merchant-scan", lambda c: q(c, mode, f"{SEL} WHERE merchant_id = %s ORDER BY id", (n + 3,)))
        want = check(f"{mode}/all-ordered-by-id", lambda c: q(c, mode, f"{SEL} ORDER BY id"))
        m.expect(f"{mode}/all-ordered-by-id reference rows", want[0] == "rows" and len(want[2]) >= 390, want[:2])
        check(f"{mode}/order-limit-offset", lambda c: q(c, mode, f"{SEL} ORDER BY create_time DESC, id LIMIT %s OFFSET %s", (10, 20)))
        check(
            f"{mode}/group-by",
            lambda c: q(c, mode, "SELECT pay_status, count(*), sum(order_amount) FROM t_order WHERE create_time >= %s GROUP BY 1 ORDER BY 1 NULLS FIRST", (ts(2026, 8, 1),)),
        )

        # writes by id: rows of every kind of id inserted by this mode
        base = 100 * (n + 1)
        new_rows = [
            # ids above 2^22 whose bits name another shard than merchant_id % 8
            (9100002 + n, f"PS-{mode}-1", 22 + n, Decimal("5.00"), "NEW", ts(2026, 11, 20, 1)),
            (40004858 + n, f"PS-{mode}-2", 1 + n, Decimal("6.10"), "NEW", ts(2026, 10, 20, 1)),
            (70000 + base, f"PS-{mode}-3", 23 + n, None, "PAID", ts(2026, 9, 21, 1)),
            ((1 << 22) + 7000 + base, f"PS-{mode}-4", 24 + n, Decimal("1.00"), None, ts(2026, 8, 22, 1)),
            (1_500_000_000_000 + base, f"PS-{mode}-5", 25 + n, Decimal("9.99"), "NEW", ts(2026, 7, 23, 1)),
            (snowflake_shaped(n + 2, base), f"PS-{mode}-6", 26 + n, Decimal("1.01"), "NEW", ts(2026, 6, 24, 1)),
            (-70000 - base, f"PS-{mode}-7", 27 + n, Decimal("2.02"), "NEW", ts(2026, 11, 1, 1)),
        ]
        check(f"{mode}/insert-explicit-ids", lambda c: tuple(q(c, mode, INSERT + " RETURNING id, order_no", r) for r in new_rows))
        check(f"{mode}/by-id/inserted", lambda c: tuple(q(c, mode, f"{SEL} WHERE id = %s", (r[0],)) for r in new_rows))
        check(
            f"{mode}/update-by-id",
            lambda c: tuple(q(c, mode, "UPDATE t_order SET pay_status = %s, order_amount = %s WHERE id = %s", (f"U-{mode}", Decimal("3.33"), r[0])) for r in new_rows),
        )
        check(f"{mode}/after-update-by-id", lambda c: q(c, mode, f"{SEL} WHERE order_no LIKE %s ORDER BY order_no", (f"PS-{mode}-%",)))
        check(f"{mode}/delete-by-id", lambda c: tuple(q(c, mode, "DELETE FROM t_order WHERE id = %s", (r[0],)) for r in new_rows[::2]))
        check(f"{mode}/after-delete-by-id", lambda c: q(c, mode, f"{SEL} WHERE order_no LIKE %s ORDER BY order_no", (f"PS-{mode}-%",)))

        def generated(c):
            r = q(c, mode, "INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status, create_time) VALUES (%s, %s, %s, %s, %s) RETURNING *",
                  (f"GEN-{mode}", 30 + n, Decimal("4.56"), "NEW", ts(2026, 11, 5, 6)))
            if r[0] != "rows":
                return (r,)
            new_id = r[2][0][r[1].index("id")]
            i = r[1].index("id")
            strip = ("rows", r[1][:i] + r[1][i + 1:], tuple(x[:i] + x[i + 1:] for x in r[2]))
            return (strip, q(c, mode, f"{SEL} WHERE id = %s", (new_id,), drop=("id",)), q(c, mode, "DELETE FROM t_order WHERE id = %s", (new_id,)))

        check(f"{mode}/insert-generated-id", generated)

        def executemany(c):
            cur = psycopg.ClientCursor(c) if mode == "client" else c.cursor()
            rows = [(60000000 + base + k, f"PM-{mode}-{k}", 1 + (k * 7) % 40, Decimal(k), "NEW", ts(2026, 6 + k % 6, 1 + k)) for k in range(12)]
            rows[3] = ((1 << 22) + 9000 + base, f"PM-{mode}-3", 5, Decimal(3), "NEW", ts(2026, 9, 4))
            if mode == "pipeline":
                with c.pipeline():
                    cur.executemany(INSERT, rows)
            else:
                cur.executemany(INSERT, rows)
            return (cur.rowcount, q(c, "server", f"{SEL} WHERE order_no LIKE %s ORDER BY order_no", (f"PM-{mode}-%",)))

        check(f"{mode}/executemany-insert", executemany)

        def tx_commit(c):
            with c.transaction():
                a = q(c, mode, "UPDATE t_order SET pay_status = %s WHERE merchant_id = %s", (f"C-{mode}", 31 + n))
                b = q(c, mode, f"SELECT count(*) FROM t_order WHERE pay_status = %s", (f"C-{mode}",))
            return (a, b, q(c, mode, f"{SEL} WHERE merchant_id = %s ORDER BY id", (31 + n,)))

        def tx_rollback(c):
            stats = "SELECT merchant_id, count(*), sum(order_amount) FROM t_order WHERE merchant_id IN (%s, %s) GROUP BY 1 ORDER BY 1"
            before = q(c, mode, stats, (35 + n, 17 + n))
            with c.transaction(force_rollback=True):
                a = q(c, mode, "DELETE FROM t_order WHERE merchant_id = %s", (35 + n,))
                b = q(c, mode, "UPDATE t_order SET order_amount = 0 WHERE merchant_id = %s", (17 + n,))
                inside = q(c, mode, stats, (35 + n, 17 + n))
            return (before, a, b, inside, q(c, mode, stats, (35 + n, 17 + n)))

        def tx_error(c):
            out = []
            try:
                with c.transaction():
                    out.append(q(c, mode, "UPDATE t_order SET pay_status = 'E' WHERE merchant_id = %s", (39,)))
                    try:
                        q(c, mode, "SELECT order_amount / 0 FROM t_order WHERE merchant_id = %s AND order_amount IS NOT NULL", (39,))
                    except psycopg.Error as e:
                        out.append(("error", e.sqlstate))
                    q(c, mode, "SELECT count(*) FROM t_order WHERE merchant_id = %s", (39,))
            except psycopg.Error as e:
                out.append(("error", e.sqlstate))
            out.append(q(c, mode, "SELECT count(*) FROM t_order WHERE pay_status = 'E'"))
            return tuple(out)

        check(f"{mode}/transaction-commit", tx_commit)
        check(f"{mode}/transaction-rollback", tx_rollback)
        check(f"{mode}/transaction-error-25P02", tx_error)
        check(f"{mode}/error-undefined-column", lambda c: q(c, mode, "SELECT nocol FROM t_order WHERE merchant_id = %s", (1,)))
        # the next mode starts from equal tables even where a write by id missed its row
        for side in (ref, px):
            side.get().execute("DELETE FROM t_order WHERE order_no LIKE %s", (f"PS-{mode}-%",))

    # pipeline mode: many statements in flight before the one Sync
    def pipeline_lookups(c):
        with c.pipeline():
            curs = []
            for k in kinds + ["missing"]:
                for i in ids[k]:
                    cur = c.cursor()
                    cur.execute(f"{SEL} WHERE id = %s", (i,))
                    curs.append(cur)
            cur = c.cursor()
            cur.execute("SELECT count(*) FROM t_order WHERE merchant_id = %s", (7,))
            curs.append(cur)
        return tuple(result(cur) for cur in curs)

    def pipeline_writes(c):
        with c.pipeline():
            a, b, d = c.cursor(), c.cursor(), c.cursor()
            a.execute("UPDATE t_order SET pay_status = %s WHERE id = %s", ("PL", ids["small"][1]))
            b.execute("UPDATE t_order SET pay_status = %s WHERE id = %s", ("PL", ids["mid"][1]))
            d.execute(f"{SEL} WHERE pay_status = %s ORDER BY id", ("PL",))
        return (result(a), result(b), result(d))

    # a connection that is not in autocommit: psycopg starts the transaction itself; in pipeline
    # mode its BEGIN travels in the same batch (before one Sync) as the first statements
    def non_autocommit_rollback(side, pipeline):
        stats = "SELECT merchant_id, count(*), sum(order_amount) FROM t_order WHERE merchant_id IN (%s, %s) GROUP BY 1 ORDER BY 1"
        with psycopg.connect(side.dsn, connect_timeout=10) as conn:
            before = result(conn.execute(stats, (11, 12)))
            conn.rollback()
            if pipeline:
                with conn.pipeline():
                    a = conn.execute("DELETE FROM t_order WHERE merchant_id = %s", (11,))
                    b = conn.execute("UPDATE t_order SET order_amount = 0 WHERE merchant_id = %s", (12,))
            else:
                a = conn.execute("DELETE FROM t_order WHERE merchant_id = %s", (11,))
                b = conn.execute("UPDATE t_order SET order_amount = 0 WHERE merchant_id = %s", (12,))
            ra, rb = result(a), result(b)
            inside = result(conn.execute(stats, (11, 12)))
            conn.rollback()
            return (before, ra, rb, inside, result(conn.execute(stats, (11, 12))))

    for pipeline in (False, True):
        name = f"{'pipeline' if pipeline else 'server'}/not-autocommit-dml-first-then-rollback"
        m.compare(name, capture(lambda: non_autocommit_rollback(ref, pipeline), sqlstate), capture(lambda: non_autocommit_rollback(px, pipeline), sqlstate))

    check("pipeline/many-lookups-one-sync", pipeline_lookups)
    check("pipeline/update-then-select-one-sync", pipeline_writes)

    # named (server-side) cursors: DECLARE ... CURSOR, FETCH FORWARD n
    def named_itersize(c):
        with c.transaction():
            cur = c.cursor(name="mx_all")
            cur.itersize = 50
            cur.execute(f"{SEL} ORDER BY id")
            rows = list(cur)
            return rows_outcome([d.name for d in cur.description], rows)

    def named_fetchmany(c):
        with c.transaction():
            cur = c.cursor(name="mx_m")
            cur.execute(f"{SEL} WHERE merchant_id = %s ORDER BY id", (5,))
            cols = [d.name for d in cur.description]
            return (rows_outcome(cols, cur.fetchmany(3)), rows_outcome(cols, [cur.fetchone()]), rows_outcome(cols, cur.fetchall()))

    def named_scroll(c):
        with c.transaction():
            cur = c.cursor(name="mx_s", scrollable=True)
            cur.execute(f"{SEL} WHERE merchant_id IN (%s, %s) ORDER BY create_time, id", (2, 3))
            cols = [d.name for d in cur.description]
            first = rows_outcome(cols, cur.fetchmany(5))
            cur.scroll(0, "absolute")
            again = rows_outcome(cols, [cur.fetchone()])
            cur.scroll(2)
            return (first, again, rows_outcome(cols, cur.fetchall()))

    def named_withhold(c):
        cur = c.cursor(name="mx_h", withhold=True)
        cur.execute(f"{SEL} WHERE create_time >= %s ORDER BY id", (ts(2026, 10, 1),))
        out = rows_outcome([d.name for d in cur.description], cur.fetchall())
        cur.close()
        return out

    check("named-cursor/itersize-50-all-rows", named_itersize)
    check("named-cursor/fetchmany-fetchone-fetchall", named_fetchmany)
    check("named-cursor/scrollable", named_scroll)
    check("named-cursor/withhold-autocommit", named_withhold)

    check("final/table", lambda c: q(c, "server", f"{SEL} ORDER BY order_no"), post=blank_generated)

    for s in (ref, px):
        if s.conn is not None and not s.conn.closed:
            s.conn.close()
    m.finish()


if __name__ == "__main__":
    main()
