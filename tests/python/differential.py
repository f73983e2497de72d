"""Differential run of the shardgate workload with psycopg 3 and asyncpg.

usage: differential.py WORKLOAD.json REFERENCE_DSN PROXY_DSN

For each client mode: reset both sides, load the orders, run every step on
the plain reference table and through shardgate, and require equal answers
(column names, rows, row counts, SQLSTATEs). Prints "<mode>: ok" per mode.
"""

import asyncio
import json
import re
import sys
from decimal import Decimal

import asyncpg
import psycopg

PLACEHOLDER = re.compile(r"\$(\d+)")


def to_pyformat(sql, params):
    """$n placeholders -> %s in order of appearance (psycopg)."""
    order = [int(m.group(1)) - 1 for m in PLACEHOLDER.finditer(sql)]
    return PLACEHOLDER.sub("%s", sql.replace("%", "%%")), [params[i] for i in order]


def norm(v):
    # compare values, not Python types that depend on the driver
    if isinstance(v, Decimal):
        return ("num", str(v))
    return v


def shape(cols, rows, step, count):
    keep = [i for i, c in enumerate(cols) if c not in step["ignore"]]
    out = [tuple(norm(r[i]) for i in keep) for r in rows]
    if not step["ordered"]:
        out.sort(key=repr)
    return ("rows", [cols[i] for i in keep], out, count)


def run_psycopg(conn, step, mode):
    params = step["params"]
    sql, args = to_pyformat(step["sql"], params) if params else (step["sql"].replace("%", "%%"), [])
    cur = psycopg.ClientCursor(conn) if mode == "client" else conn.cursor()
    try:
        if mode == "prepared":
            cur.execute(sql, args, prepare=True)
        else:
            cur.execute(sql, args)
    except psycopg.Error as e:
        return ("error", e.sqlstate)
    if cur.description is None:
        return ("count", cur.rowcount)
    cols = [d.name for d in cur.description]
    return shape(cols, cur.fetchall(), step, cur.rowcount)


def run_pipeline(conn, step):
    """The step between two unsharded statements in one psycopg pipeline
    (one Sync): answers must come back in order."""
    params = step["params"]
    sql, args = to_pyformat(step["sql"], params) if params else (step["sql"].replace("%", "%%"), [])
    try:
        with conn.pipeline():
            before = conn.execute("SELECT 'before' AS marker")
            cur = conn.cursor()
            cur.execute(sql, args)
            after = conn.execute("SELECT 'after' AS marker")
        if cur.description is None:
            middle = ("count", cur.rowcount)
        else:
            middle = shape([d.name for d in cur.description], cur.fetchall(), step, cur.rowcount)
        return ("pipeline", before.fetchall(), middle, after.fetchall())
    except psycopg.Error as e:
        return ("error", e.sqlstate)


async def run_asyncpg(conn, step):
    try:
        if step["sql"].lstrip().upper().startswith("SELECT") or "RETURNING" in step["sql"]:
            stmt = await conn.prepare(step["sql"])
            rows = await stmt.fetch(*step["params"])
            cols = [a.name for a in stmt.get_attributes()]
            return shape(cols, [tuple(r) for r in rows], step, len(rows))
        status = await conn.execute(step["sql"], *step["params"])
        return ("count", int(status.split()[-1]) if status.split()[-1].isdigit() else 0)
    except asyncpg.PostgresError as e:
        return ("error", e.sqlstate)


def check(step, want, got, mode):
    if want != got:
        raise SystemExit(f"{mode}: answers differ for {step['sql']!r}\n reference: {want!r:.2000}\n shardgate: {got!r:.2000}")
    if mode == "psycopg-pipeline" and want[0] == "pipeline":
        want = want[2]
    code = step.get("error")
    if code and want != ("error", code):
        raise SystemExit(f"{mode}: {step['sql']!r} should fail with {code}, got {want!r:.300}")
    if not code and want[0] == "error":
        raise SystemExit(f"{mode}: {step['sql']!r} failed on the reference with {want[1]}")


def reset_and_load(conns, workload):
    for c in conns:
        c.execute("DELETE FROM t_order")
        for sql in workload["load"]:
            c.execute(sql)


def pipeline_mode(workload, ref_dsn, proxy_dsn):
    with psycopg.connect(ref_dsn, autocommit=True) as ref, psycopg.connect(proxy_dsn, autocommit=True) as px:
        reset_and_load((ref, px), workload)
        n = 0
        for step in workload["steps"]:
            if step["tx"]:
                continue
            check(step, run_pipeline(ref, step), run_pipeline(px, step), "psycopg-pipeline")
            n += 1
        return n


def psycopg_mode(workload, ref_dsn, proxy_dsn, mode):
    with psycopg.connect(ref_dsn, autocommit=True) as ref, psycopg.connect(proxy_dsn, autocommit=True) as px:
        reset_and_load((ref, px), workload)
        n = 0
        for step in workload["steps"]:
            if not step["tx"]:
                check(step, run_psycopg(ref, step, mode), run_psycopg(px, step, mode), f"psycopg-{mode}")
                n += 1
                continue
            for c in (ref, px):
                c.execute("BEGIN")
            for inner in step["tx"]:
                check(inner, run_psycopg(ref, inner, mode), run_psycopg(px, inner, mode), f"psycopg-{mode}")
                n += 1
            end = {"sql": step["tx_end"], "params": [], "ordered": False, "ignore": [], "error": None, "tx": []}
            check(end, run_psycopg(ref, end, "server"), run_psycopg(px, end, "server"), f"psycopg-{mode}")
        return n


async def asyncpg_mode(workload, ref_dsn, proxy_dsn):
    # statement_cache_size=0 is not needed: shardgate keeps named statements per client
    ref = await asyncpg.connect(ref_dsn)
    px = await asyncpg.connect(proxy_dsn)
    try:
        for c in (ref, px):
            await c.execute("DELETE FROM t_order")
            for sql in workload["load"]:
                await c.execute(sql)
        n = 0
        for step in workload["steps"]:
            if not step["tx"]:
                check(step, await run_asyncpg(ref, step), await run_asyncpg(px, step), "asyncpg")
                n += 1
                continue
            for c in (ref, px):
                await c.execute("BEGIN")
            for inner in step["tx"]:
                check(inner, await run_asyncpg(ref, inner), await run_asyncpg(px, inner), "asyncpg")
                n += 1
            end = {"sql": step["tx_end"], "params": [], "ordered": False, "ignore": [], "error": None, "tx": []}
            check(end, await run_asyncpg(ref, end), await run_asyncpg(px, end), "asyncpg")
        return n
    finally:
        await ref.close()
        await px.close()


def main():
    workload = json.load(open(sys.argv[1]))
    ref_dsn, proxy_dsn = sys.argv[2], sys.argv[3]
    for mode in ("server", "client", "prepared"):
        n = psycopg_mode(workload, ref_dsn, proxy_dsn, mode)
        print(f"psycopg-{mode}: ok ({n} statements)", flush=True)
    n = pipeline_mode(workload, ref_dsn, proxy_dsn)
    print(f"psycopg-pipeline: ok ({n} statements)", flush=True)
    n = asyncio.run(asyncpg_mode(workload, ref_dsn, proxy_dsn))
    print(f"asyncpg: ok ({n} statements)", flush=True)


if __name__ == "__main__":
    main()
