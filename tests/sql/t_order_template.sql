-- The t_order template table: every shard holds it empty, month tables are made
-- from it with LIKE ... INCLUDING ALL (README, "Sharded execution"). Idempotent.
CREATE TABLE IF NOT EXISTS t_order (
    id           bigint PRIMARY KEY,
    order_no     text NOT NULL,
    merchant_id  bigint NOT NULL,
    order_amount numeric(18,2),
    pay_status   text,
    create_time  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS t_order_merchant_time ON t_order (merchant_id, create_time);
CREATE UNIQUE INDEX IF NOT EXISTS t_order_order_no ON t_order (order_no);
CREATE INDEX IF NOT EXISTS t_order_status_time ON t_order (pay_status, create_time);
