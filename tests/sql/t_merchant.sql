-- Merchant info on db_default, served through shardgate's cache (README, "Merchant info cache").
CREATE TABLE IF NOT EXISTS t_merchant (
    merchant_id    bigint PRIMARY KEY,
    merchant_name  text NOT NULL,
    status         smallint NOT NULL DEFAULT 1,
    fee_rate       numeric(6, 4) NOT NULL DEFAULT 0.0060,
    settle_account text,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
