"""SQLAlchemy 2 ORM (postgresql+psycopg) in the driver matrix: a mapped
class over t_order; session.get() by ids of every kind; unit-of-work
inserts (explicit ids, and generated ids through insertmanyvalues),
updates and deletes by primary key; session.rollback(); Query.count() and
select(func.count()).select_from(Order) with a merchant filter.

usage: sqlalchemy_matrix.py IDS.tsv REFERENCE_DSN PROXY_DSN
"""

import datetime
import sys
from decimal import Decimal
from typing import Optional

from sqlalchemy import BigInteger, DateTime, Numeric, Text, create_engine, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from matrix import PASS, UTC, Matrix, blank_generated, capture, load_ids, norm, rows_outcome, snowflake_shaped

DRIVER = "sqlalchemy"
COLUMNS = ("id", "order_no", "merchant_id", "order_amount", "pay_status", "create_time")

# Documented refusals (0A000 with a message saying what to change).
REFUSALS = {
    # insertmanyvalues: INSERT INTO t_order (...) SELECT p0::VARCHAR, ... FROM (VALUES ...) AS imp_sen(...)
    # ORDER BY sen_counter RETURNING ...; INSERT ... SELECT into t_order is refused (README)
    "uow/insert-generated-ids-add-all": "INSERT ... SELECT into t_order is refused with 0A000",
}

# Known gaps: still run and compared; each must differ in exactly its known way.
KNOWN_GAPS = {}


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "t_order"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    order_no: Mapped[str] = mapped_column(Text, unique=True)
    merchant_id: Mapped[int] = mapped_column(BigInteger)
    order_amount: Mapped[Optional[Decimal]] = mapped_column(Numeric(12, 2))
    pay_status: Mapped[Optional[str]] = mapped_column(Text)
    create_time: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))


def sqlstate(e):
    return getattr(getattr(e, "orig", None), "sqlstate", None) or getattr(e, "sqlstate", None)


def ts(y, m, d, h=0):
    return datetime.datetime(y, m, d, h, tzinfo=UTC)


def row(o, drop=()):
    """An Order as a comparable tuple (None stays None)."""
    if o is None:
        return None
    return tuple(norm(getattr(o, c)) for c in COLUMNS if c not in drop)


def orders(objs, drop=()):
    return ("orders", tuple(c for c in COLUMNS if c not in drop), tuple(row(o, drop) for o in objs))


def url(dsn):
    scheme, rest = dsn.split("://", 1)
    return "postgresql+psycopg://" + rest


def main():
    ids = load_ids(sys.argv[1])
    engines = {"ref": create_engine(url(sys.argv[2]), pool_size=2, max_overflow=0), "px": create_engine(url(sys.argv[3]), pool_size=2, max_overflow=0)}
    m = Matrix(DRIVER, REFUSALS, KNOWN_GAPS)
    kinds = [k for k in ids if k != "missing"]

    def check(name, fn, post=lambda o: o):
        out = []
        for side in ("ref", "px"):
            with Session(engines[side]) as s:
                out.append(post(capture(lambda: fn(s), sqlstate)))
                s.rollback()
        m.compare(name, out[0], out[1])
        return out[0]

    # ---- session.get by primary key, ids of every kind
    for kind in kinds + ["missing"]:
        check(f"get/{kind}", lambda s, k=kind: tuple(row(s.get(Order, i)) for i in ids[k]))

    # ---- reads through the ORM
    want = check("select/all-ordered-by-id", lambda s: orders(s.scalars(select(Order).order_by(Order.id)).all()))
    m.expect("select/all-ordered-by-id reference rows", want[0] == "orders" and len(want[2]) == 400, want[:2])
    check("select/by-merchant", lambda s: orders(s.scalars(select(Order).where(Order.merchant_id == 6).order_by(Order.create_time, Order.id)).all()))
    check("select/id-in", lambda s: orders(s.scalars(select(Order).where(Order.id.in_([i for k in kinds for i in ids[k]])).order_by(Order.id)).all()))
    for mm in (1, 8, 23, 40, 99):
        check(f"query-count/merchant-{mm}", lambda s, mm=mm: s.query(Order).filter(Order.merchant_id == mm).count())
        check(f"select-func-count/merchant-{mm}", lambda s, mm=mm: s.scalar(select(func.count()).select_from(Order).where(Order.merchant_id == mm)))
    check("select-func-count/group-by", lambda s: tuple(tuple(norm(x) for x in r) for r in s.execute(
        select(Order.pay_status, func.count(), func.sum(Order.order_amount)).group_by(Order.pay_status).order_by(Order.pay_status.asc().nulls_first())).all()))

    # ---- unit of work: insert with explicit ids of every kind
    new = [
        (9100002, "SA-1", 22, Decimal("5.00"), "NEW", ts(2026, 11, 20, 1)),
        (40004858, "SA-2", 1, Decimal("6.10"), "NEW", ts(2026, 10, 20, 1)),
        (70001, "SA-3", 23, None, "PAID", ts(2026, 9, 21, 1)),
        ((1 << 22) + 7777, "SA-4", 24, Decimal("1.00"), None, ts(2026, 8, 22, 1)),
        (1_500_000_000_000, "SA-5", 25, Decimal("9.99"), "NEW", ts(2026, 7, 23, 1)),
        (snowflake_shaped(6, 99), "SA-6", 26, Decimal("1.01"), "NEW", ts(2026, 6, 24, 1)),
        (-70001, "SA-7", 27, Decimal("2.02"), "NEW", ts(2026, 11, 1, 1)),
    ]

    def add_explicit(s):
        s.add_all([Order(id=r[0], order_no=r[1], merchant_id=r[2], order_amount=r[3], pay_status=r[4], create_time=r[5]) for r in new])
        s.commit()
        return orders(s.scalars(select(Order).where(Order.order_no.like("SA-%")).order_by(Order.order_no)).all())

    check("uow/insert-explicit-ids", add_explicit)
    check("get/inserted", lambda s: tuple(row(s.get(Order, r[0])) for r in new))

    # ---- unit of work: generated ids (INSERT ... RETURNING id), one object and several
    def add_generated_one(s):
        o = Order(order_no="GEN-SA1", merchant_id=13, order_amount=Decimal("12.34"), pay_status="NEW", create_time=ts(2026, 11, 3, 4))
        s.add(o)
        s.commit()
        new_id = o.id
        s.expire_all()
        got = s.get(Order, new_id)
        return (row(got, drop=("id",)), new_id is not None)

    def add_generated_many(s):
        s.add_all([Order(order_no=f"GEN-SAM{k}", merchant_id=k * 5, order_amount=Decimal(k), pay_status="NEW", create_time=ts(2026, 6 + k, 2)) for k in range(1, 5)])
        s.commit()
        return orders(s.scalars(select(Order).where(Order.order_no.like("GEN-SAM%")).order_by(Order.order_no)).all(), drop=("id",))

    check("uow/insert-generated-id-then-get", add_generated_one)
    check("uow/insert-generated-ids-add-all", add_generated_many)
    if m.last != PASS:
        # refused (or failed) through shardgate: its rows are only in the reference; the
        # final table is compared without them (when it passes, they stay on both sides)
        for e in engines.values():
            with e.begin() as conn:
                conn.execute(text("DELETE FROM t_order WHERE order_no LIKE 'GEN-SAM%'"))

    # ---- unit of work: update / delete by primary key
    def update_loaded_by_get(s):
        out = []
        for k in kinds:
            o = s.get(Order, ids[k][0])
            if o is None:
                out.append((k, "get returned None"))
                continue
            o.pay_status = "SG"
            o.order_amount = Decimal("7.77")
            s.commit()
            out.append((k, "updated"))
        return (tuple(out), orders(s.scalars(select(Order).where(Order.pay_status == "SG").order_by(Order.id)).all()))

    def update_loaded_by_merchant(s):
        objs = s.scalars(select(Order).where(Order.merchant_id == 3).order_by(Order.id)).all()
        for o in objs:
            o.pay_status = "SU"
        s.commit()  # one UPDATE ... WHERE t_order.id = %(id)s per object (StaleDataError when a count is off)
        return orders(s.scalars(select(Order).where(Order.merchant_id == 3).order_by(Order.id)).all())

    def delete_loaded_by_merchant(s):
        objs = s.scalars(select(Order).where(Order.merchant_id == 4).order_by(Order.id)).all()
        for o in objs[::2]:
            s.delete(o)
        s.commit()  # DELETE ... WHERE t_order.id = %(id)s
        return orders(s.scalars(select(Order).where(Order.merchant_id == 4).order_by(Order.id)).all())

    def update_delete_inserted(s):
        for r in new:
            o = s.get(Order, r[0])
            if o is not None:
                o.pay_status = "SX"
        s.commit()
        for r in new[::2]:
            o = s.get(Order, r[0])
            if o is not None:
                s.delete(o)
        s.commit()
        return orders(s.scalars(select(Order).where(Order.order_no.like("SA-%")).order_by(Order.order_no)).all())

    check("uow/update-by-pk-after-get", update_loaded_by_get)
    check("uow/update-by-pk-loaded-by-merchant", update_loaded_by_merchant)
    check("uow/delete-by-pk-loaded-by-merchant", delete_loaded_by_merchant)
    check("uow/update-delete-inserted-by-pk", update_delete_inserted)

    # ---- session.rollback()
    def rollback(s):
        def stats():
            return tuple(tuple(norm(x) for x in r) for r in s.execute(
                select(Order.merchant_id, func.count(), func.sum(Order.order_amount)).where(Order.merchant_id.in_([11, 12])).group_by(Order.merchant_id).order_by(Order.merchant_id)).all())

        before = stats()
        for o in s.scalars(select(Order).where(Order.merchant_id == 11)).all():
            o.order_amount = Decimal("0.01")
        for o in s.scalars(select(Order).where(Order.merchant_id == 12)).all():
            s.delete(o)
        s.add(Order(id=63000001, order_no="SR-1", merchant_id=12, order_amount=Decimal("1"), pay_status="NEW", create_time=ts(2026, 10, 10)))
        s.flush()
        inside = stats()
        s.rollback()
        return (before, inside, stats(), row(s.get(Order, 63000001)))

    check("session/rollback", rollback)

    # ---- errors through the ORM keep their SQLSTATE
    def dup_order_no(s):
        s.add(Order(id=63000002, order_no="S00041", merchant_id=2, order_amount=None, pay_status=None, create_time=ts(2026, 10, 17)))
        s.commit()
        return "committed"

    check("error/duplicate-order-no-other-merchant", dup_order_no)
    # what that left behind (when it did not fail: the known gap) is not compared again below
    for e in engines.values():
        with e.begin() as conn:
            conn.execute(text("DELETE FROM t_order WHERE id = 63000002"))

    def final(s):
        r = s.execute(text("SELECT id, order_no, merchant_id, order_amount, pay_status, create_time FROM t_order ORDER BY order_no"))
        return rows_outcome(list(r.keys()), r.all())

    check("final/table", final, post=blank_generated)

    for e in engines.values():
        e.dispose()
    m.finish()


if __name__ == "__main__":
    main()
