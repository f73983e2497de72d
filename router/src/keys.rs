//! Shard keys and the `merchant_id % shard_count` rule, in one place.
//! Negative keys use the Euclidean remainder so every bigint has exactly one shard.

use std::fmt;

/// A value of the shard-key column (`merchant_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MerchantId(pub i64);

/// Index of a shard database (`db_N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u8);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "db_{}", self.0)
    }
}

/// The shard that holds rows of `merchant`: `merchant % shard_count`, taken
/// as the non-negative (Euclidean) remainder so `-1` lands on the last shard.
///
/// `shard_count` is validated by the config to be 1..=8.
pub fn shard_of(merchant: MerchantId, shard_count: u8) -> ShardId {
    debug_assert!(shard_count > 0);
    let n = i64::from(shard_count.max(1));
    // rem_euclid of a positive modulus is in 0..n, which fits in u8.
    ShardId(merchant.0.rem_euclid(n) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn edges() {
        assert_eq!(shard_of(MerchantId(0), 8), ShardId(0));
        assert_eq!(shard_of(MerchantId(13), 8), ShardId(5));
        assert_eq!(shard_of(MerchantId(-1), 8), ShardId(7));
        assert_eq!(shard_of(MerchantId(i64::MAX), 8), ShardId(7));
        assert_eq!(shard_of(MerchantId(i64::MIN), 8), ShardId(0));
    }

    proptest! {
        #[test]
        fn shard_is_in_range_and_periodic(m in any::<i64>(), n in 1u8..=8) {
            let s = shard_of(MerchantId(m), n);
            prop_assert!(s.0 < n);
            if let Some(next) = m.checked_add(i64::from(n)) {
                prop_assert_eq!(shard_of(MerchantId(next), n), s);
            }
            if m >= 0 {
                prop_assert_eq!(i64::from(s.0), m % i64::from(n));
            }
        }
    }
}
