//! Column values as the merger sees them: decoded from PostgreSQL's text or
//! binary format into keys that compare, group and add up the way the server
//! would, and encoded back for the client.
//!
//! Only the types an order store merges on are understood; anything else can
//! still be grouped or de-duplicated by its bytes, but not ordered or added —
//! those are refused with `0A000` rather than answered in a wrong order.

use std::cmp::Ordering;
use std::str::FromStr;

use bigdecimal::num_bigint::{BigInt, Sign};
use bigdecimal::{BigDecimal, Zero};
use crate::protocol::sqlstate;

/// Type OIDs the merger understands.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
}

/// Why a value could not be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The type has no known order or arithmetic here.
    #[error("{0}")]
    Unsupported(String),
    /// A server sent something that does not decode (should not happen).
    #[error("cannot decode a {0} value from a shard")]
    Malformed(&'static str),
    /// Arithmetic overflow while combining.
    #[error("{0} out of range while combining shard results")]
    Overflow(&'static str),
    /// The merge would hold more rows than `server.max_merge_rows`.
    #[error("{0}")]
    Limit(String),
}

impl ValueError {
    /// The SQLSTATE the client gets.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ValueError::Unsupported(_) => sqlstate::FEATURE_NOT_SUPPORTED,
            ValueError::Malformed(_) => sqlstate::INTERNAL_ERROR,
            ValueError::Overflow(_) => sqlstate::NUMERIC_VALUE_OUT_OF_RANGE,
            ValueError::Limit(_) => sqlstate::PROGRAM_LIMIT_EXCEEDED,
        }
    }
}

/// A decoded value with PostgreSQL's ordering and equality.
#[derive(Debug, Clone)]
pub enum Key {
    /// int2/int4/int8/oid.
    Int(i64),
    /// float4/float8: NaN is greater than everything and equal to itself; -0 = 0.
    Float(f64),
    /// numeric: `None` is NaN (greatest); infinities as `Inf(±1)`.
    Num(NumKey),
    /// bool.
    Bool(bool),
    /// timestamp/timestamptz microseconds, or date days; infinities at the ends.
    Time(i64),
    /// text-like types in the "C" collation, and any type compared only for equality.
    Bytes(Vec<u8>),
}

/// numeric ordering key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum NumKey {
    /// -Infinity.
    NegInf,
    /// A finite value, normalized (trailing zeros dropped so 1.0 = 1.00).
    Finite(BigDecimal),
    /// +Infinity.
    PosInf,
    /// NaN (PostgreSQL sorts it above every other numeric).
    NaN,
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Key::Int(a), Key::Int(b)) => a.cmp(b),
            (Key::Float(a), Key::Float(b)) => float_cmp(*a, *b),
            (Key::Num(a), Key::Num(b)) => a.cmp(b),
            (Key::Bool(a), Key::Bool(b)) => a.cmp(b),
            (Key::Time(a), Key::Time(b)) => a.cmp(b),
            (Key::Bytes(a), Key::Bytes(b)) => a.cmp(b),
            // one column always decodes to one variant; order variants arbitrarily but totally
            (a, b) => a.rank().cmp(&b.rank()),
        }
    }
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            Key::Int(v) => v.hash(state),
            Key::Float(v) => {
                let v = if *v == 0.0 { 0.0 } else { *v };
                if v.is_nan() {
                    u64::MAX.hash(state)
                } else {
                    v.to_bits().hash(state)
                }
            }
            Key::Num(n) => match n {
                NumKey::Finite(d) => d.to_string().hash(state),
                other => std::mem::discriminant(other).hash(state),
            },
            Key::Bool(b) => b.hash(state),
            Key::Time(t) => t.hash(state),
            Key::Bytes(b) => b.hash(state),
        }
    }
}

impl Key {
    fn rank(&self) -> u8 {
        match self {
            Key::Int(_) => 0,
            Key::Float(_) => 1,
            Key::Num(_) => 2,
            Key::Bool(_) => 3,
            Key::Time(_) => 4,
            Key::Bytes(_) => 5,
        }
    }
}

fn float_cmp(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// True when values of `oid` can be ordered by the merger.
pub fn orderable(oid: u32) -> bool {
    use oid::*;
    matches!(oid, BOOL | NAME | INT8 | INT2 | INT4 | TEXT | OID | FLOAT4 | FLOAT8 | BPCHAR | VARCHAR | DATE | TIMESTAMP | TIMESTAMPTZ | NUMERIC)
}

/// True when two values of `oid` are equal exactly when their decoded keys
/// are (the orderable types, and types whose text form is canonical). Others
/// — interval ('1 day' = '24:00:00'), jsonb, numeric arrays, money, … — cannot
/// be grouped or de-duplicated across shards.
pub fn equatable(type_oid: u32) -> bool {
    const UUID: u32 = 2950;
    const CHAR: u32 = 18;
    // bool[], int2[], int4[], text[], varchar[], int8[]
    const ARRAYS: [u32; 6] = [1000, 1005, 1007, 1009, 1015, 1016];
    orderable(type_oid) || matches!(type_oid, oid::BYTEA | UUID | CHAR) || ARRAYS.contains(&type_oid)
}

/// A key for grouping or de-duplicating values of `type_oid` across shards.
pub fn group_key(type_oid: u32, binary: bool, v: &[u8]) -> Result<Key, ValueError> {
    if !equatable(type_oid) {
        return Err(ValueError::Unsupported(format!(
            "GROUP BY, DISTINCT or count(DISTINCT …) on a value of type oid {type_oid} across shards is not supported \
             (equal values of this type can print differently); cast it to text or a number, or add the shard key to WHERE"
        )));
    }
    decode(type_oid, binary, v)
}

/// Decodes a value for ordering, grouping and comparison. Types without a
/// known order become `Bytes` (equality only; callers check [`orderable`]).
pub fn decode(type_oid: u32, binary: bool, v: &[u8]) -> Result<Key, ValueError> {
    use oid::*;
    if binary {
        return Ok(match type_oid {
            INT2 => Key::Int(i16::from_be_bytes(arr(v, "int2")?) as i64),
            INT4 => Key::Int(i32::from_be_bytes(arr(v, "int4")?) as i64),
            OID => Key::Int(u32::from_be_bytes(arr(v, "oid")?) as i64),
            INT8 => Key::Int(i64::from_be_bytes(arr(v, "int8")?)),
            FLOAT4 => Key::Float(f32::from_be_bytes(arr(v, "float4")?) as f64),
            FLOAT8 => Key::Float(f64::from_be_bytes(arr(v, "float8")?)),
            BOOL => Key::Bool(v.first().copied().ok_or(ValueError::Malformed("bool"))? != 0),
            TIMESTAMP | TIMESTAMPTZ => Key::Time(i64::from_be_bytes(arr(v, "timestamp")?)),
            DATE => Key::Time(i32::from_be_bytes(arr(v, "date")?) as i64),
            NUMERIC => Key::Num(num_key(&numeric_from_binary(v)?)?),
            BPCHAR => Key::Bytes(trim_bpchar(v).to_vec()),
            _ => Key::Bytes(v.to_vec()),
        });
    }
    let s = || std::str::from_utf8(v).map_err(|_| ValueError::Malformed("text"));
    Ok(match type_oid {
        INT2 | INT4 | INT8 | OID => Key::Int(s()?.parse().map_err(|_| ValueError::Malformed("integer"))?),
        FLOAT4 | FLOAT8 => Key::Float(parse_float(s()?)?),
        BOOL => Key::Bool(v == b"t"),
        NUMERIC => Key::Num(num_key(s()?)?),
        TIMESTAMP | TIMESTAMPTZ | DATE => Key::Time(time_key(s()?, type_oid)?),
        BPCHAR => Key::Bytes(trim_bpchar(v).to_vec()),
        _ => Key::Bytes(v.to_vec()),
    })
}

fn trim_bpchar(v: &[u8]) -> &[u8] {
    let end = v.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    &v[..end]
}

fn arr<const N: usize>(v: &[u8], what: &'static str) -> Result<[u8; N], ValueError> {
    v.try_into().map_err(|_| ValueError::Malformed(what))
}

fn parse_float(s: &str) -> Result<f64, ValueError> {
    match s {
        "NaN" => Ok(f64::NAN),
        "Infinity" => Ok(f64::INFINITY),
        "-Infinity" => Ok(f64::NEG_INFINITY),
        _ => s.parse().map_err(|_| ValueError::Malformed("float")),
    }
}

/// A number literal's key: an integer if it is spelled as one (and fits
/// bigint), else numeric (`1.5`, `1e0`), as PostgreSQL types constants.
pub fn number_key(s: &str) -> Result<Key, ValueError> {
    if let Ok(i) = s.parse::<i64>() {
        return Ok(Key::Int(i));
    }
    num_key(s).map(Key::Num)
}

/// Compares two values as PostgreSQL's cross-type operators do: integers,
/// numerics and floats by value (int and numeric exactly, anything with a
/// float as float8); other kinds only with their own kind (a mix is an
/// internal error rather than an arbitrary answer).
pub fn cmp_values(a: &Key, b: &Key) -> Result<Ordering, ValueError> {
    let as_num = |k: &Key| -> Option<NumKey> {
        match k {
            Key::Int(i) => Some(NumKey::Finite(BigDecimal::from(*i))),
            Key::Num(n) => Some(n.clone()),
            _ => None,
        }
    };
    let as_float = |k: &Key| -> Option<f64> {
        match k {
            Key::Int(i) => Some(*i as f64),
            Key::Float(f) => Some(*f),
            Key::Num(NumKey::Finite(d)) => d.to_string().parse().ok(),
            Key::Num(NumKey::NaN) => Some(f64::NAN),
            Key::Num(NumKey::PosInf) => Some(f64::INFINITY),
            Key::Num(NumKey::NegInf) => Some(f64::NEG_INFINITY),
            _ => None,
        }
    };
    Ok(match (a, b) {
        (Key::Float(_), _) | (_, Key::Float(_)) => match (as_float(a), as_float(b)) {
            (Some(x), Some(y)) => Key::Float(x).cmp(&Key::Float(y)),
            _ => return Err(ValueError::Malformed("values of different types compared")),
        },
        (Key::Int(_) | Key::Num(_), Key::Int(_) | Key::Num(_)) => match (as_num(a), as_num(b)) {
            (Some(x), Some(y)) => x.cmp(&y),
            _ => return Err(ValueError::Malformed("values of different types compared")),
        },
        _ if a.rank() == b.rank() => a.cmp(b),
        _ => return Err(ValueError::Malformed("values of different types compared")),
    })
}

fn num_key(s: &str) -> Result<NumKey, ValueError> {
    Ok(match s {
        "NaN" => NumKey::NaN,
        "Infinity" => NumKey::PosInf,
        "-Infinity" => NumKey::NegInf,
        _ => NumKey::Finite(BigDecimal::from_str(s).map_err(|_| ValueError::Malformed("numeric"))?.normalized()),
    })
}

/// Microseconds since 2000-01-01 (days for dates), PostgreSQL's binary epoch.
fn time_key(s: &str, type_oid: u32) -> Result<i64, ValueError> {
    use shardgate_router::month::{parse_time, TimeValue};
    let tz = jiff::tz::TimeZone::UTC;
    let pg_epoch_us = 946_684_800_000_000i64;
    // BC dates and the like: refuse rather than mis-order
    match parse_time(s, &tz).map_err(|_| ValueError::Unsupported(format!("cannot order the value {s:?} across shards")))? {
        TimeValue::At(ts) => {
            let us = ts.as_microsecond() - pg_epoch_us;
            Ok(if type_oid == oid::DATE { us.div_euclid(86_400_000_000) } else { us })
        }
        TimeValue::Infinity => Ok(i64::MAX),
        TimeValue::NegInfinity => Ok(i64::MIN),
        TimeValue::Unknown => Err(ValueError::Malformed("timestamp")),
    }
}

// ---------------------------------------------------------------- numeric

/// numeric binary format → its text form.
pub fn numeric_from_binary(v: &[u8]) -> Result<String, ValueError> {
    let bad = || ValueError::Malformed("numeric");
    if v.len() < 8 {
        return Err(bad());
    }
    let rd = |i: usize| i16::from_be_bytes([v[2 * i], v[2 * i + 1]]);
    let (ndigits, weight, sign, dscale) = (rd(0), rd(1), rd(2) as u16, rd(3));
    match sign {
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        0x0000 | 0x4000 => {}
        _ => return Err(bad()),
    }
    if ndigits < 0 || v.len() != 8 + 2 * ndigits as usize || dscale < 0 {
        return Err(bad());
    }
    let digits: Vec<i16> = (0..ndigits as usize).map(|i| rd(4 + i)).collect();
    let mut int_part = String::new();
    let mut frac = String::new();
    for (i, d) in digits.iter().enumerate() {
        let w = weight as i32 - i as i32;
        if w >= 0 {
            if int_part.is_empty() {
                int_part.push_str(&d.to_string())
            } else {
                int_part.push_str(&format!("{d:04}"))
            }
            if w > 0 && i == digits.len() - 1 {
                for _ in 0..w {
                    int_part.push_str("0000");
                }
            }
        } else {
            if frac.is_empty() && w < -1 {
                for _ in 0..(-w - 1) {
                    frac.push_str("0000");
                }
            }
            frac.push_str(&format!("{d:04}"));
        }
    }
    if int_part.is_empty() {
        int_part.push('0');
    }
    let dscale = dscale as usize;
    while frac.len() < dscale {
        frac.push('0');
    }
    frac.truncate(dscale);
    let mut out = String::new();
    if sign == 0x4000 && (int_part.bytes().any(|b| b != b'0') || frac.bytes().any(|b| b != b'0')) {
        out.push('-');
    }
    out.push_str(&int_part);
    if dscale > 0 {
        out.push('.');
        out.push_str(&frac);
    }
    Ok(out)
}

/// numeric text form → binary format.
pub fn numeric_to_binary(s: &str, out: &mut Vec<u8>) -> Result<(), ValueError> {
    let special = match s {
        "NaN" => Some(0xC000u16),
        "Infinity" => Some(0xD000),
        "-Infinity" => Some(0xF000),
        _ => None,
    };
    if let Some(sign) = special {
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        return Ok(());
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let (int_part, frac) = body.split_once('.').unwrap_or((body, ""));
    if int_part.is_empty() || !int_part.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValueError::Malformed("numeric"));
    }
    let dscale = frac.len();
    let int_part = int_part.trim_start_matches('0');
    // pad so groups of 4 align on the decimal point
    let lead = (4 - int_part.len() % 4) % 4;
    let mut all = "0".repeat(lead);
    all.push_str(int_part);
    let int_groups = all.len() / 4;
    all.push_str(frac);
    all.push_str(&"0".repeat((4 - frac.len() % 4) % 4));
    let mut groups: Vec<i16> = all.as_bytes().chunks(4).map(|c| std::str::from_utf8(c).ok().and_then(|t| t.parse().ok()).unwrap_or(0)).collect();
    let mut weight = int_groups as i32 - 1;
    while groups.first() == Some(&0) {
        groups.remove(0);
        weight -= 1;
    }
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    let sign: u16 = if neg && !groups.is_empty() { 0x4000 } else { 0 };
    out.extend_from_slice(&(groups.len() as i16).to_be_bytes());
    out.extend_from_slice(&(weight as i16).to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&(dscale as i16).to_be_bytes());
    for g in groups {
        out.extend_from_slice(&g.to_be_bytes());
    }
    Ok(())
}

/// Digits after the decimal point in a numeric's text form.
fn dscale_of(s: &str) -> usize {
    s.split_once('.').map_or(0, |(_, f)| f.len())
}

/// Weight and first digit of a value in base 10000 (PostgreSQL's NumericVar).
fn weight_and_first_digit(d: &BigDecimal) -> (i32, i32) {
    if d.is_zero() {
        return (0, 0);
    }
    let s = d.abs().to_plain_string();
    let (i, f) = s.split_once('.').unwrap_or((&s, ""));
    let i = i.trim_start_matches('0');
    if !i.is_empty() {
        let top = match i.len() % 4 {
            0 => 4,
            n => n,
        };
        return (((i.len() - 1) / 4) as i32, i[..top].parse().unwrap_or(0));
    }
    let mut f = f.to_string();
    while f.len() % 4 != 0 {
        f.push('0');
    }
    for (k, c) in f.as_bytes().chunks(4).enumerate() {
        let g: i32 = std::str::from_utf8(c).ok().and_then(|t| t.parse().ok()).unwrap_or(0);
        if g != 0 {
            return (-(k as i32) - 1, g);
        }
    }
    (0, 0)
}

/// `numeric_div` as PostgreSQL computes `avg`: scale from `select_div_scale`,
/// rounded half away from zero.
pub fn numeric_avg(sum_text: &str, count: i64) -> Result<String, ValueError> {
    match sum_text {
        "NaN" | "Infinity" | "-Infinity" => return Ok(sum_text.to_string()),
        _ => {}
    }
    let sum = BigDecimal::from_str(sum_text).map_err(|_| ValueError::Malformed("numeric"))?;
    let cnt = BigDecimal::from(count);
    let (w1, f1) = weight_and_first_digit(&sum);
    let (w2, f2) = weight_and_first_digit(&cnt);
    let mut qweight = w1 - w2;
    if f1 <= f2 {
        qweight -= 1;
    }
    let rscale = (16 - qweight * 4).max(dscale_of(sum_text) as i32).clamp(0, 1000) as i64;
    // exact: round(m * 10^(r-s) / count) with sum = m * 10^-s
    let (m, s) = sum.as_bigint_and_exponent();
    let shift = rscale - s;
    let num = if shift >= 0 { m * BigInt::from(10).pow(shift as u32) } else { m };
    let den = if shift >= 0 { BigInt::from(count) } else { BigInt::from(count) * BigInt::from(10).pow((-shift) as u32) };
    let q = &num / &den;
    let r = &num - &q * &den;
    let twice = (r.magnitude() * 2u32) >= *den.magnitude();
    let q = if twice {
        if (num.sign() == Sign::Minus) != (den.sign() == Sign::Minus) {
            q - 1
        } else {
            q + 1
        }
    } else {
        q
    };
    Ok(BigDecimal::new(q, rscale).to_plain_string())
}

/// Adds numeric text values; the result keeps the largest scale, as PostgreSQL's sum does.
pub fn numeric_add(a: &str, b: &str) -> Result<String, ValueError> {
    let special = |s: &str| matches!(s, "NaN" | "Infinity" | "-Infinity");
    if special(a) || special(b) {
        let r = match (a, b) {
            ("NaN", _) | (_, "NaN") => "NaN",
            ("Infinity", "-Infinity") | ("-Infinity", "Infinity") => "NaN",
            ("Infinity", _) | (_, "Infinity") => "Infinity",
            _ => "-Infinity",
        };
        return Ok(r.to_string());
    }
    let scale = dscale_of(a).max(dscale_of(b)) as i64;
    let x = BigDecimal::from_str(a).map_err(|_| ValueError::Malformed("numeric"))?;
    let y = BigDecimal::from_str(b).map_err(|_| ValueError::Malformed("numeric"))?;
    Ok((x + y).with_scale(scale).to_plain_string())
}

// ---------------------------------------------------------------- floats

/// float8 text as PostgreSQL prints it (shortest exact digits; exponent form
/// outside 1e-4 ≤ |x| < 1e15).
pub fn float8_text(v: f64) -> String {
    float_text(v, format!("{v:e}"), 15)
}

/// float4 text as PostgreSQL prints it.
pub fn float4_text(v: f32) -> String {
    float_text(v as f64, format!("{v:e}"), 6)
}

fn float_text(v: f64, sci: String, digits: i32) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let ds: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if exp < -4 || exp >= digits {
        out.push_str(&ds[..1]);
        if ds.len() > 1 {
            out.push('.');
            out.push_str(&ds[1..]);
        }
        out.push_str(&format!("e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs()));
    } else if exp < 0 {
        out.push_str("0.");
        out.push_str(&"0".repeat((-exp - 1) as usize));
        out.push_str(&ds);
    } else {
        let int_len = exp as usize + 1;
        if ds.len() <= int_len {
            out.push_str(&ds);
            out.push_str(&"0".repeat(int_len - ds.len()));
        } else {
            out.push_str(&ds[..int_len]);
            out.push('.');
            out.push_str(&ds[int_len..]);
        }
    }
    out
}

/// A computed value in text form, encoded for the client in `binary` or text.
pub fn encode(type_oid: u32, binary: bool, text: &str) -> Result<Vec<u8>, ValueError> {
    if !binary {
        return Ok(text.as_bytes().to_vec());
    }
    let bad = || ValueError::Malformed("computed value");
    Ok(match type_oid {
        oid::INT8 => text.parse::<i64>().map_err(|_| bad())?.to_be_bytes().to_vec(),
        oid::INT4 => text.parse::<i32>().map_err(|_| bad())?.to_be_bytes().to_vec(),
        oid::INT2 => text.parse::<i16>().map_err(|_| bad())?.to_be_bytes().to_vec(),
        oid::FLOAT8 => parse_float(text)?.to_be_bytes().to_vec(),
        oid::FLOAT4 => (parse_float(text)? as f32).to_be_bytes().to_vec(),
        oid::NUMERIC => {
            let mut out = Vec::new();
            numeric_to_binary(text, &mut out)?;
            out
        }
        other => return Err(ValueError::Unsupported(format!("binary result format for computed values of type oid {other}"))),
    })
}

/// Running total of one summed column, by the column's type.
#[derive(Debug, Clone, Default)]
pub enum Acc {
    /// No non-NULL part yet.
    #[default]
    Empty,
    /// int8 (count, sum of int2/int4).
    Int(i64),
    /// numeric, kept in text with its scale.
    Num(String),
    /// float4/float8.
    Float(f64),
}

impl Acc {
    /// Adds one part (text format, as targets return aggregates).
    pub fn add(&mut self, type_oid: u32, part: Option<&[u8]>) -> Result<(), ValueError> {
        let Some(part) = part else { return Ok(()) };
        let s = std::str::from_utf8(part).map_err(|_| ValueError::Malformed("aggregate"))?;
        *self = match (std::mem::replace(self, Acc::Empty), type_oid) {
            (Acc::Empty, oid::INT8 | oid::INT4 | oid::INT2) => Acc::Int(s.parse().map_err(|_| ValueError::Malformed("integer"))?),
            (Acc::Int(a), oid::INT8 | oid::INT4 | oid::INT2) => {
                let b: i64 = s.parse().map_err(|_| ValueError::Malformed("integer"))?;
                Acc::Int(a.checked_add(b).ok_or(ValueError::Overflow("bigint"))?)
            }
            (Acc::Empty, oid::NUMERIC) => Acc::Num(s.to_string()),
            (Acc::Num(a), oid::NUMERIC) => Acc::Num(numeric_add(&a, s)?),
            (Acc::Empty, oid::FLOAT8) => Acc::Float(parse_float(s)?),
            // one table adds every value in one order; parts added here give other last digits
            // (and a real's partial sum is rounded to real, where avg(real) adds in double)
            (Acc::Float(_), oid::FLOAT8) | (_, oid::FLOAT4) => {
                return Err(ValueError::Unsupported(
                    "sum/avg of real or double precision values from several shards can differ from one table's in the last digits \
                     (floating-point addition depends on its order); cast to numeric (sum(x::numeric)) or narrow the query to one merchant"
                        .into(),
                ))
            }
            (_, other) => {
                return Err(ValueError::Unsupported(format!(
                    "sum of type oid {other} across shards is not supported; group by the shard key or narrow the query to one merchant"
                )))
            }
        };
        Ok(())
    }

    /// The total in text form for a column of `type_oid`; `None` = NULL.
    pub fn text(&self, type_oid: u32) -> Option<String> {
        match self {
            Acc::Empty => None,
            Acc::Int(v) => Some(v.to_string()),
            Acc::Num(s) => Some(s.clone()),
            Acc::Float(f) => Some(if type_oid == oid::FLOAT4 { float4_text(*f as f32) } else { float8_text(*f) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_binary_round_trips() {
        for s in ["0", "1", "-1", "12345.6789", "0.0001", "0.00012", "100000000", "123.40", "-0.50", "99999999999999999999.99", "0.000", "10000"] {
            let mut b = Vec::new();
            numeric_to_binary(s, &mut b).expect("encode");
            assert_eq!(numeric_from_binary(&b).expect("decode"), s, "{s}");
        }
    }

    #[test]
    fn numeric_binary_matches_postgres_layout() {
        // 12345.678 = digits [1, 2345, 6780], weight 1, dscale 3
        let mut b = Vec::new();
        numeric_to_binary("12345.678", &mut b).expect("encode");
        assert_eq!(b, vec![0, 3, 0, 1, 0, 0, 0, 3, 0, 1, 0x09, 0x29, 0x1a, 0x7c]);
    }

    #[test]
    fn avg_scale_follows_select_div_scale() {
        // values checked against PostgreSQL 15: select avg(x) from (values ...) v(x)
        assert_eq!(numeric_avg("3", 2).expect("avg"), "1.5000000000000000");
        assert_eq!(numeric_avg("300.00", 3).expect("avg"), "100.0000000000000000");
        assert_eq!(numeric_avg("10", 3).expect("avg"), "3.3333333333333333");
        assert_eq!(numeric_avg("2", 3).expect("avg"), "0.66666666666666666667");
        assert_eq!(numeric_avg("-2", 3).expect("avg"), "-0.66666666666666666667");
        assert_eq!(numeric_avg("123456789.12", 7).expect("avg"), "17636684.160000000000");
    }

    #[test]
    fn sums_keep_the_largest_scale() {
        assert_eq!(numeric_add("1.50", "2.5").expect("add"), "4.00");
        assert_eq!(numeric_add("-1.50", "1.5").expect("add"), "0.00");
        assert_eq!(numeric_add("NaN", "1").expect("add"), "NaN");
    }

    #[test]
    fn floats_print_like_postgres() {
        assert_eq!(float8_text(1.5), "1.5");
        assert_eq!(float8_text(100.0), "100");
        assert_eq!(float8_text(1e15), "1e+15");
        assert_eq!(float8_text(123456789012345.0), "123456789012345");
        assert_eq!(float8_text(0.0001), "0.0001");
        assert_eq!(float8_text(0.00001), "1e-05");
        assert_eq!(float8_text(-2.25e-7), "-2.25e-07");
        assert_eq!(float8_text(0.1 + 0.2), "0.30000000000000004");
        assert_eq!(float4_text(1234567.0), "1.234567e+06");
    }

    #[test]
    fn keys_order_like_postgres() {
        let n = |s: &str| decode(oid::NUMERIC, false, s.as_bytes()).expect("numeric");
        assert!(n("1.0") == n("1.00"));
        assert!(n("-Infinity") < n("-1e9") && n("2") < n("10") && n("Infinity") < n("NaN"));
        let f = |s: &str| decode(oid::FLOAT8, false, s.as_bytes()).expect("float");
        assert!(f("NaN") > f("Infinity") && f("-0") == f("0"));
        let t = |s: &str| decode(oid::TIMESTAMPTZ, false, s.as_bytes()).expect("ts");
        assert!(t("2026-11-01 01:00:00+02") < t("2026-11-01 00:30:00+00"));
        let mut b = Vec::new();
        numeric_to_binary("-12.5", &mut b).expect("encode");
        assert!(decode(oid::NUMERIC, true, &b).expect("binary") == n("-12.50"));
    }
}
