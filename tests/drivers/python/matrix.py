"""Shared by the Python programs of the driver matrix (tests/tests/drivers.rs).

Every check runs the same function on the reference connection and on the
shardgate connection and compares the outcomes: rows (values normalized so
that only the data counts), column names, row counts, SQLSTATEs. Error
messages are shown in a diff but never compared.

Each check ends in one of these (the same rules in PgJdbcMatrix.java and
pg_matrix.js):

- `PASS <driver> <check>`: shardgate answered exactly like the one table.
- `REFUSED <driver> <check>: <message>`: the reference succeeded and
  shardgate refused the statement with SQLSTATE 0A000 and a message saying
  what to change, and the check is in the driver's explicit allowlist of
  documented refusals. A 0A000 on any other check is a FAIL (a new refusal
  must be noticed); an allowlisted check that now passes is a PASS.
- `KNOWN GAP <driver> <check> (<reason>): reference ..., proxy ...`: the
  check is in the driver's explicit list of known gaps (each naming its issue)
  and shardgate's answer differs from the reference in exactly the known way.
  A known-gap check that differs in any other way is a FAIL; one that now
  answers like the reference prints `FIXED <driver> <check>: remove it from
  the known gaps` and is a FAIL too, so the list cannot go stale.
- `FAIL <driver> <check>` with a diff.

A list entry that names no check that ran is a FAIL as well. The run ends
with `<driver>: ok (N passed, R refused, K known gaps)`, or
`<driver>: FAILED (k of N checks): ...` and exit status 1.
"""

import datetime
import decimal
import sys
import traceback
from collections import Counter

ROW_COLUMNS = "id, order_no, merchant_id, order_amount, pay_status, create_time"
SEL = f"SELECT {ROW_COLUMNS} FROM t_order"
UTC = datetime.timezone.utc

# reasons of known gaps shared by several drivers (PgJdbcMatrix.java and pg_matrix.js say the same)
ISSUE_18_ID = "issue 18: application ids are unique only within one shard's month table (order_no is unique everywhere: unique_lookups)"


def load_ids(path):
    """ids.tsv: `kind<TAB>id,id,...` per line -> {kind: [ids]} (in file order)."""
    kinds = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                kind, ids = line.rstrip("\n").split("\t")
                kinds[kind] = [int(x) for x in ids.split(",")]
    return kinds


def snowflake_shaped(shard, seq):
    """Same layout as drivers.rs: ms 2026-08-15 since 2024-01-01, worker 3."""
    return 82_684_800_000 << 22 | 3 << 16 | (shard & 7) << 12 | (seq & 0xFFF)


class Msg(str):
    """An error message: shown, never compared."""

    def __eq__(self, other):
        return isinstance(other, Msg)

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return 0


def norm(v):
    """Compare values, not the Python types a driver picked."""
    if isinstance(v, decimal.Decimal):
        return ("num", str(v))
    if isinstance(v, datetime.datetime):
        if v.tzinfo is not None:
            v = v.astimezone(UTC)
        return ("ts", v.isoformat())
    if isinstance(v, (list, tuple)):
        return tuple(norm(x) for x in v)
    if isinstance(v, dict):
        return tuple((k, norm(x)) for k, x in v.items())
    return v


def rows_outcome(cols, rows, ordered=True, drop=()):
    """("rows", column names, rows) with `drop` columns left out."""
    keep = [i for i, c in enumerate(cols) if c not in drop]
    out = [tuple(norm(r[i]) for i in keep) for r in rows]
    if not ordered:
        out.sort(key=repr)
    return ("rows", tuple(cols[i] for i in keep), tuple(out))


def blank_generated(outcome, prefix="GEN"):
    """Final-state comparisons: ids of rows inserted without an id differ by design."""
    if outcome[0] != "rows" or "id" not in outcome[1] or "order_no" not in outcome[1]:
        return outcome
    i, o = outcome[1].index("id"), outcome[1].index("order_no")
    rows = tuple(tuple(None if (k == i and str(r[o]).startswith(prefix)) else v for k, v in enumerate(r)) for r in outcome[2])
    return ("rows", outcome[1], rows)


def _short(x, n=1500):
    s = repr(x)
    return s if len(s) <= n else s[:n] + f"... ({len(s)} chars)"


def _is_seq(x):
    """A sequence of answers (not one outcome tuple)."""
    return isinstance(x, (list, tuple)) and not (x and x[0] in ("rows", "error", "count"))


def diff(want, got):
    lines = []
    if isinstance(want, tuple) and isinstance(got, tuple) and want[:1] == got[:1] == ("rows",) and len(want) == len(got) >= 3:
        if want[3:] != got[3:]:
            lines.append(f"   row count: reference {want[3:]} / shardgate {got[3:]}")
        if want[1] != got[1]:
            lines.append(f"   columns: reference {want[1]} / shardgate {got[1]}")
        w, g = list(want[2]), list(got[2])
        lines.append(f"   rows: reference {len(w)} / shardgate {len(g)}")
        cw, cg = Counter(map(repr, w)), Counter(map(repr, g))
        only_w, only_g = cw - cg, cg - cw
        for r, n in list(only_w.items())[:8]:
            lines.append(f"   - only in reference{f' (x{n})' if n > 1 else ''}: {r[:300]}")
        for r, n in list(only_g.items())[:8]:
            lines.append(f"   + only in shardgate{f' (x{n})' if n > 1 else ''}: {r[:300]}")
        if len(only_w) > 8 or len(only_g) > 8:
            lines.append(f"   ({sum(only_w.values())} rows only in reference, {sum(only_g.values())} only in shardgate in all)")
        for k in range(max(len(w), len(g))):
            a, b = (w[k] if k < len(w) else None), (g[k] if k < len(g) else None)
            if a != b:
                lines.append(f"   first difference at row {k}: reference {_short(a, 300)} / shardgate {_short(b, 300)}")
                break
        return "\n".join(lines)
    if _is_seq(want) and _is_seq(got) and len(want) == len(got) > 1:
        for k, (a, b) in enumerate(zip(want, got)):
            if a != b:
                sub = diff(a, b)
                if "rows:" in sub:
                    lines.append(f"   [{k}]:\n{sub}")
                else:
                    lines.append(f"   [{k}] reference: {_short(a, 600)}\n   [{k}] shardgate: {_short(b, 600)}")
        return "\n".join(lines)
    return f"   reference: {_short(want)}\n   shardgate: {_short(got)}"


PASS, REFUSED, GAP, FAIL = "pass", "refused", "known gap", "fail"


def is_error(o, code=None):
    """Whether an outcome is an error (of SQLSTATE `code`): the check raised."""
    return isinstance(o, tuple) and len(o) == 3 and o[0] == "error" and (code is None or o[1] == code)


def is_refusal(want, got):
    """The reference succeeded; shardgate refused with 0A000 and said why."""
    return not is_error(want) and is_error(got, "0A000") and bool(str(got[2]).strip())


class KnownGap:
    """A tracked difference: `reason` names the issue, `matches(want, got)`
    recognises that difference and no other, `shape` says it in words."""

    def __init__(self, reason, shape, matches):
        self.reason, self.shape, self.matches = reason, shape, matches


def duplicate_accepted(reason):
    """The one table refuses a duplicate key (23505); shardgate accepts the row."""
    return KnownGap(reason, "reference 23505, shardgate accepts the row", lambda w, g: is_error(w, "23505") and not is_error(g))


def proxy_error(reason, code):
    """The reference succeeds; shardgate fails with SQLSTATE `code`."""
    return KnownGap(reason, f"reference succeeds, shardgate fails with {code}", lambda w, g: not is_error(w) and is_error(g, code))


class Matrix:
    """`refusals`: {check: why the refusal is documented}; `known_gaps`: {check: KnownGap}."""

    def __init__(self, driver, refusals=None, known_gaps=None):
        self.driver = driver
        self.refusals = dict(refusals or {})
        self.known_gaps = dict(known_gaps or {})
        both = set(self.refusals) & set(self.known_gaps)
        assert not both, f"both a documented refusal and a known gap: {sorted(both)}"
        self.checks = 0
        self.passed = 0
        self.refused = []
        self.gaps = []
        self.failed = []
        self.seen = set()
        self.last = None

    def _verdict(self, check, verdict):
        self.last = verdict
        if verdict == PASS:
            self.passed += 1
        elif verdict == REFUSED:
            self.refused.append(check)
        elif verdict == GAP:
            self.gaps.append(check)
        else:
            self.failed.append(check)
        return verdict

    def compare(self, check, want, got):
        """Compares and classifies one check; returns its verdict (also in `self.last`)."""
        self.checks += 1
        self.seen.add(check)
        gap = self.known_gaps.get(check)
        if want == got:
            if gap is not None:
                print(f"FIXED {self.driver} {check}: remove it from the known gaps ({gap.reason})", flush=True)
                return self._verdict(check, FAIL)
            print(f"PASS {self.driver} {check}", flush=True)
            return self._verdict(check, PASS)
        if check in self.refusals and is_refusal(want, got):
            print(f"REFUSED {self.driver} {check}: {got[2]}", flush=True)
            return self._verdict(check, REFUSED)
        if gap is not None and gap.matches(want, got):
            print(f"KNOWN GAP {self.driver} {check} ({gap.reason}): reference {_short(want, 300)}, proxy {_short(got, 300)}", flush=True)
            return self._verdict(check, GAP)
        why = ""
        if gap is not None:
            why = f" (a known gap, but not the known difference: {gap.shape})"
        elif check in self.refusals:
            why = " (a documented refusal, but not a 0A000 with a message after the reference succeeded)"
        elif is_refusal(want, got):
            why = " (a 0A000 refusal that is not in this driver's allowlist of documented refusals)"
        print(f"FAIL {self.driver} {check}{why}\n{diff(want, got)}", flush=True)
        return self._verdict(check, FAIL)

    def expect(self, check, cond, detail):
        """A check that the reference itself must meet (keeps comparisons from passing vacuously)."""
        self.checks += 1
        self.seen.add(check)
        if cond:
            print(f"PASS {self.driver} {check}", flush=True)
            self._verdict(check, PASS)
            return
        print(f"FAIL {self.driver} {check}: {detail}", flush=True)
        self._verdict(check, FAIL)

    def finish(self):
        for check in [c for c in list(self.refusals) + list(self.known_gaps) if c not in self.seen]:
            kind = "documented refusal" if check in self.refusals else "known gap"
            print(f"FAIL {self.driver} {check}: listed as a {kind} but no such check ran", flush=True)
            self.failed.append(check)
        if self.failed:
            print(f"{self.driver}: FAILED ({len(self.failed)} of {self.checks} checks): {', '.join(self.failed)}", flush=True)
            sys.exit(1)
        print(f"{self.driver}: ok ({self.passed} passed, {len(self.refused)} refused, {len(self.gaps)} known gaps)", flush=True)


def error_outcome(e, sqlstate):
    """("error", SQLSTATE or exception class, message)."""
    code = sqlstate(e)
    if code is None:
        code = type(e).__name__
    return ("error", code, Msg(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__))


def capture(fn, sqlstate):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - every failure is an outcome to compare
        if sqlstate(e) is None and not _is_db_error(e):
            traceback.print_exc(file=sys.stderr)
        return error_outcome(e, sqlstate)


async def acapture(coro_fn, sqlstate):
    try:
        return await coro_fn()
    except Exception as e:  # noqa: BLE001
        if sqlstate(e) is None and not _is_db_error(e):
            traceback.print_exc(file=sys.stderr)
        return error_outcome(e, sqlstate)


def _is_db_error(e):
    name = type(e).__module__
    return name.startswith(("psycopg", "asyncpg", "sqlalchemy"))
