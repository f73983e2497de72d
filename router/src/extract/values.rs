//! Integer values of a condition or a row: literals, bound parameters in text
//! or binary, arrays of either.

use super::*;

/// A shard-key or id value once bind values are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IntValue {
    Int(i64),
    Null,
    /// Valid for PostgreSQL but not a bigint we can route on (decimal, numeric beyond bigint).
    Unroutable,
}

/// What a literal taken out of the text stands for: the same source the
/// router reads from that literal in the text.
pub(crate) fn literal_src(value: &str, integer: bool) -> Src {
    if integer {
        value.parse::<i64>().map_or_else(|_| Src::Number(value.to_string()), Src::Int)
    } else {
        Src::Text(value.to_string())
    }
}

pub(crate) fn param<'a>(params: &[Param<'a>], i: usize) -> Result<Param<'a>> {
    params.get(i).copied().ok_or_else(|| {
        RouteError::Protocol(format!("the statement uses ${} but {} parameter value(s) were bound", i + 1, params.len()))
    })
}

pub(crate) fn int_from_text(s: &str) -> Result<IntValue> {
    // the whitespace PostgreSQL's int8in skips (isspace in the C locale), not Unicode's
    let t = s.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c'));
    match t.parse::<i64>() {
        Ok(i) => Ok(IntValue::Int(i)),
        Err(_) if { let digits = t.trim_start_matches(['-', '+']); !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) } => {
            Err(RouteError::OutOfRange(format!("value \"{t}\" is out of range for type bigint")))
        }
        Err(_) => Err(RouteError::InvalidValue(format!("invalid input syntax for type bigint: \"{t}\""))),
    }
}

pub(crate) fn int_from_binary(oid: u32, b: &[u8]) -> IntValue {
    match (oid, b.len()) {
        (20 | 0, 8) => IntValue::Int(i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
        (23 | 0, 4) => IntValue::Int(i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        (21 | 0, 2) => IntValue::Int(i64::from(i16::from_be_bytes([b[0], b[1]]))),
        _ => IntValue::Unroutable,
    }
}

/// Resolves an integer-valued source (shard key or id).
pub(crate) fn int_value(src: &Src, params: &[Param<'_>]) -> Result<IntValue> {
    match src {
        Src::Int(i) => Ok(IntValue::Int(*i)),
        Src::Number(_) | Src::Opaque | Src::Civil(..) => Ok(IntValue::Unroutable),
        Src::Null => Ok(IntValue::Null),
        Src::Text(s) => int_from_text(s),
        Src::Param(i) => match param(params, *i)? {
            Param::Null => Ok(IntValue::Null),
            Param::Text(s) => int_from_text(s),
            Param::Binary { oid, bytes } => Ok(int_from_binary(oid, bytes)),
            Param::Literal { value, integer } => int_value(&literal_src(value, integer), params),
        },
    }
}

/// Elements of an array value: PostgreSQL text form `{1,2,NULL}` or binary int4/int8 arrays.
pub(crate) fn array_values(src: &Src, params: &[Param<'_>]) -> Result<Option<Vec<IntValue>>> {
    let text = match src {
        Src::Text(s) => s.as_str(),
        Src::Param(i) => match param(params, *i)? {
            Param::Null => return Ok(Some(Vec::new())),
            Param::Text(s) => s,
            Param::Binary { bytes, .. } => return Ok(binary_int_array(bytes)),
            Param::Literal { value, integer } => return array_values(&literal_src(value, integer), params),
        },
        _ => return Ok(None),
    };
    let t = text.trim();
    if t.starts_with('[') {
        return Ok(None); // explicit bounds ('[0:1]={1,9}'): valid, left to the shards
    }
    let Some(inner) = t.strip_prefix('{').and_then(|r| r.strip_suffix('}')) else {
        return Err(RouteError::InvalidValue(format!("malformed array literal: \"{t}\"")));
    };
    if inner.contains(['{', '"']) {
        return Ok(None); // nested or quoted elements: not a plain bigint[]
    }
    if inner.trim().is_empty() {
        return Ok(Some(Vec::new()));
    }
    inner
        .split(',')
        .map(|e| if e.trim().eq_ignore_ascii_case("null") { Ok(IntValue::Null) } else { int_from_text(e) })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Decodes PostgreSQL's binary array format for int2/int4/int8 elements.
pub(crate) fn binary_int_array(b: &[u8]) -> Option<Vec<IntValue>> {
    let rd = |at: usize| -> Option<i32> { b.get(at..at + 4).map(|s| i32::from_be_bytes([s[0], s[1], s[2], s[3]])) };
    let ndim = usize::try_from(rd(0)?).ok()?;
    let elem_oid = u32::try_from(rd(8)?).ok()?;
    if ndim > 6 || !matches!(elem_oid, 20 | 23 | 21) {
        return None;
    }
    let mut count = if ndim == 0 { 0usize } else { 1 };
    let mut at = 12;
    for _ in 0..ndim {
        count = count.checked_mul(usize::try_from(rd(at)?).ok()?)?;
        at += 8;
    }
    let mut out = Vec::with_capacity(count.min(b.len() / 4));
    for _ in 0..count {
        let len = rd(at)?;
        at += 4;
        if len < 0 {
            out.push(IntValue::Null);
            continue;
        }
        let len = usize::try_from(len).ok()?;
        out.push(int_from_binary(elem_oid, b.get(at..at + len)?));
        at += len;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_read_as_postgresql_reads_them() {
        assert_eq!(int_from_text(" 42\n").ok(), Some(IntValue::Int(42)));
        assert_eq!(int_from_text("\x0b7\x0c").ok(), Some(IntValue::Int(7)));
        // a no-break space is not whitespace to int8in: 22P02
        assert!(matches!(int_from_text("3\u{a0}"), Err(RouteError::InvalidValue(_))));
        assert!(matches!(int_from_text("99999999999999999999"), Err(RouteError::OutOfRange(_))));
    }
}
