//! The order schema of the local system: the `t_order` template table every
//! shard holds (month tables are created from it with `LIKE … INCLUDING ALL`),
//! and the merchant table on `db_default`.

/// Template table and its indexes (README, "Routing"), idempotent.
pub const T_ORDER_TEMPLATE: &str = include_str!("../sql/t_order_template.sql");

/// Merchant info on `db_default` (served through the cache), idempotent.
pub const T_MERCHANT: &str = include_str!("../sql/t_merchant.sql");
