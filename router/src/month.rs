//! Months: `create_time` → `yyyyMM` in the configured zone, and ranges of months.
//! No clock reads: "now" always comes from the caller.

use std::fmt;

use jiff::{civil, tz::TimeZone, Timestamp};

use crate::error::{Result, RouteError};

/// A calendar month in the configured zone; names the physical table `t_order_{yyyyMM}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MonthKey {
    /// Calendar year (jiff's range, -9999..=9999).
    pub year: i16,
    /// 1..=12.
    pub month: u8,
}

impl MonthKey {
    /// Builds a month, `None` when `month` is not 1..=12 or the year is outside -9999..=9999.
    pub fn new(year: i16, month: u8) -> Option<MonthKey> {
        ((1..=12).contains(&month) && (-9999..=9999).contains(&year)).then_some(MonthKey { year, month })
    }

    /// Months since year 0, so consecutive months differ by one.
    pub fn ordinal(self) -> i32 {
        i32::from(self.year) * 12 + i32::from(self.month) - 1
    }

    /// Inverse of [`MonthKey::ordinal`].
    pub fn from_ordinal(ordinal: i32) -> Option<MonthKey> {
        let year = i16::try_from(ordinal.div_euclid(12)).ok()?;
        MonthKey::new(year, (ordinal.rem_euclid(12) + 1) as u8)
    }

    /// The month containing `ts` in zone `tz`.
    pub fn of(ts: Timestamp, tz: &TimeZone) -> MonthKey {
        let dt = tz.to_datetime(ts);
        MonthKey { year: dt.year(), month: dt.month() as u8 }
    }

    /// `yyyyMM` as used in physical table names (years before 1000 are zero-padded).
    pub fn suffix(self) -> String {
        let mut s = String::with_capacity(6);
        self.push_suffix(&mut s);
        s
    }

    /// Appends [`MonthKey::suffix`] to `out` (planning renders one per target).
    pub fn push_suffix(self, out: &mut String) {
        match u16::try_from(self.year) {
            Ok(y) if y <= 9999 => {
                let digits = [y / 1000, y / 100 % 10, y / 10 % 10, y % 10, u16::from(self.month / 10), u16::from(self.month % 10)];
                out.extend(digits.iter().map(|d| char::from(b'0' + *d as u8)));
            }
            _ => {
                use std::fmt::Write;
                let _ = write!(out, "{:04}{:02}", self.year, self.month);
            }
        }
    }

    /// Parses `yyyyMM` (as printed by [`MonthKey::suffix`]).
    pub fn parse_suffix(s: &str) -> Option<MonthKey> {
        if s.len() != 6 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        MonthKey::new(s[..4].parse().ok()?, s[4..].parse().ok()?)
    }

    /// The first instant of this month in `tz`.
    pub fn start(self, tz: &TimeZone) -> Option<Timestamp> {
        let d = civil::date(self.year, self.month as i8, 1);
        d.to_zoned(tz.clone()).ok().map(|z| z.timestamp())
    }
}

impl fmt::Display for MonthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}{:02}", self.year, self.month)
    }
}

/// One end of a time range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// No limit on this side.
    Unbounded,
    /// Includes the instant.
    Inclusive(Timestamp),
    /// Excludes the instant.
    Exclusive(Timestamp),
}

/// A parsed `create_time` value as PostgreSQL reads a timestamptz literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeValue {
    /// A point in time.
    At(Timestamp),
    /// `'infinity'`.
    Infinity,
    /// `'-infinity'`.
    NegInfinity,
    /// `'now'`, `'today'`, … : known only to the server at execution time.
    Unknown,
}

/// Parses a timestamptz/timestamp/date literal the way PostgreSQL does for the
/// common ISO forms; a civil time without an offset is read in `tz` (the
/// session TimeZone shardgate assumes).
pub fn parse_time(text: &str, tz: &TimeZone) -> Result<TimeValue> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    match lower.as_str() {
        "infinity" | "+infinity" => return Ok(TimeValue::Infinity),
        "-infinity" => return Ok(TimeValue::NegInfinity),
        "now" | "today" | "tomorrow" | "yesterday" => return Ok(TimeValue::Unknown),
        "epoch" => return Ok(TimeValue::At(Timestamp::UNIX_EPOCH)),
        _ => {}
    }
    let bad = || RouteError::InvalidDatetime(format!("invalid input syntax for type timestamp with time zone: \"{t}\""));
    if t.is_empty() || !t.as_bytes()[0].is_ascii_digit() {
        // Named months, BC dates, etc.: valid for PostgreSQL maybe, but not routable here.
        return Err(RouteError::unsupported(format!(
            "shardgate reads create_time values in ISO form (YYYY-MM-DD[ HH:MM:SS[.ffffff]][+HH[:MM]]), got \"{t}\"; write the time in ISO form"
        )));
    }
    // PostgreSQL rolls a leap second (:60) over and rounds beyond microseconds, which
    // can move the value into the next month; jiff clamps and keeps nanoseconds
    if t.contains(":60") || fraction_digits(t) > 6 {
        return Ok(TimeValue::Unknown);
    }
    // Normalise the PostgreSQL spellings jiff does not take: "+08" and "+0800" offsets.
    let norm = normalise_offset(t);
    // Pick the one parser that fits the shape: failed jiff parses build rich
    // errors, which costs more than routing itself.
    let has_offset = norm.ends_with(['Z', 'z']) || norm.get(10..).is_some_and(|rest| rest.contains(['+', '-']));
    if has_offset {
        return norm.parse::<Timestamp>().map(TimeValue::At).map_err(|_| bad());
    }
    if norm.len() == 10 {
        let d = norm.parse::<civil::Date>().map_err(|_| bad())?;
        return d.to_zoned(tz.clone()).map(|z| TimeValue::At(z.timestamp())).map_err(|_| bad());
    }
    if let Ok(dt) = norm.parse::<civil::DateTime>() {
        return dt.to_zoned(tz.clone()).map(|z| TimeValue::At(z.timestamp())).map_err(|_| bad());
    }
    Err(bad())
}

/// [`parse_time`] with the session's zone; `None` is a zone shardgate cannot
/// read: a time written with an offset is still read, one without it is Unknown.
pub fn parse_time_in(text: &str, tz: Option<&TimeZone>) -> Result<TimeValue> {
    match tz {
        Some(tz) => parse_time(text, tz),
        None => {
            let t = text.trim();
            let offset = t.ends_with(['Z', 'z']) || t.get(10..).is_some_and(|rest| rest.contains(['+', '-']));
            match parse_time(t, &TimeZone::UTC)? {
                TimeValue::At(_) if !offset => Ok(TimeValue::Unknown),
                v => Ok(v),
            }
        }
    }
}

/// The civil part of a timestamp text, as `timestamp without time zone` (or
/// `date`, with `date_only`) keeps it: `2026-11-01 05:00 -10` → `2026-11-01 05:00`.
pub fn civil_prefix(text: &str, date_only: bool) -> &str {
    let t = text.trim();
    let b = t.as_bytes();
    let mut i = 0;
    while i < b.len() && i < 10 && (b[i].is_ascii_digit() || b[i] == b'-') {
        i += 1;
    }
    if !date_only && i < b.len() && (b[i] == b' ' || b[i] == b'T') {
        let mut k = i + 1;
        while k < b.len() && (b[k].is_ascii_digit() || b[k] == b':' || b[k] == b'.') {
            k += 1;
        }
        if k > i + 1 {
            i = k;
        }
    }
    &t[..i]
}

/// Digits after the seconds' decimal point.
fn fraction_digits(t: &str) -> usize {
    t.find('.').map_or(0, |p| t[p + 1..].bytes().take_while(u8::is_ascii_digit).count())
}

/// `2026-11-01 10:00:00+08` → `2026-11-01 10:00:00+08:00`; `+0800` → `+08:00`.
fn normalise_offset(t: &str) -> std::borrow::Cow<'_, str> {
    // Only look after the time part: find the last '+' or '-' beyond the date.
    let Some(pos) = t.get(10..).and_then(|rest| rest.rfind(['+', '-'])).map(|p| p + 10) else {
        return t.into();
    };
    let off = &t[pos + 1..];
    if off.len() == 2 && off.bytes().all(|b| b.is_ascii_digit()) {
        return format!("{t}:00").into();
    }
    if off.len() == 4 && off.bytes().all(|b| b.is_ascii_digit()) {
        return format!("{}{}:{}", &t[..=pos], &off[..2], &off[2..]).into();
    }
    t.into()
}

/// Decodes a binary timestamptz/timestamp (microseconds since 2000-01-01 UTC).
pub fn time_from_binary_micros(micros: i64) -> TimeValue {
    match micros {
        i64::MAX => TimeValue::Infinity,
        i64::MIN => TimeValue::NegInfinity,
        _ => {
            const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
            micros
                .checked_add(PG_EPOCH_UNIX_MICROS)
                .and_then(|u| Timestamp::from_microsecond(u).ok())
                .map_or(TimeValue::Unknown, TimeValue::At)
        }
    }
}

/// Months of `[lo, hi]` among `existing` (sorted ascending).
pub fn months_in_range(lo: Bound, hi: Bound, tz: &TimeZone, existing: &[MonthKey]) -> Vec<MonthKey> {
    let lo_m = match lo {
        Bound::Unbounded => None,
        Bound::Inclusive(t) => Some(MonthKey::of(t, tz)),
        // An exclusive lower bound still admits later instants of the same month.
        Bound::Exclusive(t) => Some(MonthKey::of(t, tz)),
    };
    let hi_m = match hi {
        Bound::Unbounded => None,
        Bound::Inclusive(t) => Some(MonthKey::of(t, tz)),
        // PostgreSQL timestamps have microsecond resolution.
        Bound::Exclusive(t) => Some(MonthKey::of(t.checked_sub(jiff::SignedDuration::from_micros(1)).unwrap_or(t), tz)),
    };
    existing
        .iter()
        .copied()
        .filter(|m| lo_m.is_none_or(|l| *m >= l) && hi_m.is_none_or(|h| *m <= h))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn suffix_is_the_zero_padded_year_and_month_for_every_month() {
        for year in -9999..=9999i16 {
            for month in 1..=12u8 {
                let m = MonthKey { year, month };
                assert_eq!(m.suffix(), format!("{year:04}{month:02}"));
            }
        }
        let rule = crate::topology::TableRule {
            name: "t".into(),
            shard_key: "k".into(),
            month_column: "c".into(),
            id_column: "id".into(),
            pattern: "{yyyyMM}_t_{yyyyMM}x".into(),
            unique_lookups: Vec::new(),
        };
        assert_eq!(rule.physical(MonthKey { year: 7, month: 3 }), "000703_t_000703x");
    }

    fn utc() -> TimeZone {
        TimeZone::UTC
    }

    fn at(s: &str) -> Timestamp {
        match parse_time(s, &utc()).expect("parse") {
            TimeValue::At(t) => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_postgres_spellings() {
        let tz = utc();
        assert_eq!(MonthKey::of(at("2026-11-01"), &tz), MonthKey { year: 2026, month: 11 });
        assert_eq!(at("2026-11-01 10:00:00+08"), at("2026-11-01T02:00:00Z"));
        assert_eq!(at("2026-11-01 10:00:00+0800"), at("2026-11-01T02:00:00Z"));
        assert_eq!(at("2026-11-01 10:00:00.123456-03:30"), at("2026-11-01T13:30:00.123456Z"));
        assert_eq!(at("2026-12-31T23:59:59.999999"), at("2026-12-31 23:59:59.999999+00"));
        assert_eq!(parse_time("infinity", &tz), Ok(TimeValue::Infinity));
        assert_eq!(parse_time(" now ", &tz), Ok(TimeValue::Unknown));
        assert_eq!(parse_time("2026-13-01", &tz).map_err(|e| e.sqlstate()), Err("22007"));
        assert_eq!(parse_time("Nov 1 2026", &tz).map_err(|e| e.sqlstate()), Err("0A000"));
    }

    #[test]
    fn zone_moves_the_month() {
        let shanghai = TimeZone::get("Asia/Shanghai").expect("tzdb");
        // 2026-11-30 20:00 UTC is already December in Shanghai.
        let t = at("2026-11-30T20:00:00Z");
        assert_eq!(MonthKey::of(t, &utc()).to_string(), "202611");
        assert_eq!(MonthKey::of(t, &shanghai).to_string(), "202612");
        // A civil literal is read in the configured zone.
        let TimeValue::At(local) = parse_time("2026-12-01 00:30:00", &shanghai).expect("parse") else { panic!() };
        assert_eq!(MonthKey::of(local, &shanghai).to_string(), "202612");
        assert_eq!(MonthKey::of(local, &utc()).to_string(), "202611");
    }

    #[test]
    fn exclusive_upper_bound_at_month_start_excludes_that_month() {
        let tz = utc();
        let existing: Vec<MonthKey> = (1..=12).filter_map(|m| MonthKey::new(2026, m)).collect();
        let got = months_in_range(Bound::Inclusive(at("2026-10-15")), Bound::Exclusive(at("2026-12-01")), &tz, &existing);
        assert_eq!(got.iter().map(|m| m.to_string()).collect::<Vec<_>>(), ["202610", "202611"]);
        let got = months_in_range(Bound::Inclusive(at("2026-10-15")), Bound::Inclusive(at("2026-12-01")), &tz, &existing);
        assert_eq!(got.len(), 3);
        let got = months_in_range(Bound::Exclusive(at("2026-12-31 23:59:59.999999")), Bound::Unbounded, &tz, &existing);
        assert_eq!(got.iter().map(|m| m.to_string()).collect::<Vec<_>>(), ["202612"]);
    }

    #[test]
    fn binary_timestamps() {
        assert_eq!(time_from_binary_micros(0), TimeValue::At(at("2000-01-01T00:00:00Z")));
        assert_eq!(time_from_binary_micros(i64::MAX), TimeValue::Infinity);
        assert_eq!(time_from_binary_micros(i64::MIN), TimeValue::NegInfinity);
    }

    proptest! {
        #[test]
        fn ordinal_round_trip(year in -9999i16..=9999, month in 1u8..=12) {
            let m = MonthKey::new(year, month).expect("valid");
            prop_assert_eq!(MonthKey::from_ordinal(m.ordinal()), Some(m));
            prop_assert_eq!(MonthKey::parse_suffix(&m.suffix()).filter(|_| year >= 0), if year >= 0 { Some(m) } else { None });
        }

        #[test]
        fn month_of_instant_matches_civil_fields(secs in -2_000_000_000i64..8_000_000_000) {
            let tz = TimeZone::get("America/Sao_Paulo").expect("tzdb");
            let ts = Timestamp::from_second(secs).expect("in range");
            let m = MonthKey::of(ts, &tz);
            let start = m.start(&tz).expect("start");
            let next = MonthKey::from_ordinal(m.ordinal() + 1).and_then(|n| n.start(&tz)).expect("next");
            // The instant lies in [start of its month, start of the next month).
            prop_assert!(start <= ts && ts < next);
        }

        #[test]
        fn range_membership_is_exact(a in 0i64..4_000_000_000, len in 0i64..200_000_000) {
            let tz = utc();
            let lo = Timestamp::from_second(a).expect("ts");
            let hi = Timestamp::from_second(a + len).expect("ts");
            let existing: Vec<MonthKey> = (MonthKey::of(lo, &tz).ordinal() - 2..=MonthKey::of(hi, &tz).ordinal() + 2)
                .filter_map(MonthKey::from_ordinal).collect();
            let got = months_in_range(Bound::Inclusive(lo), Bound::Exclusive(hi), &tz, &existing);
            for m in &existing {
                let start = m.start(&tz).expect("start");
                let end = MonthKey::from_ordinal(m.ordinal() + 1).and_then(|n| n.start(&tz)).expect("end");
                // A month is chosen iff [start, end) intersects [lo, hi).
                let intersects = start < hi && lo < end;
                prop_assert_eq!(got.contains(m), intersects, "month {} lo {} hi {}", m, lo, hi);
            }
        }
    }
}
