//! The order schema of the local system: the `t_order` template table every
//! shard holds (month tables are created from it with `LIKE … INCLUDING ALL`).

/// Template table and its indexes (DESIGN.md §2), idempotent.
pub const T_ORDER_TEMPLATE: &str = include_str!("../sql/t_order_template.sql");
