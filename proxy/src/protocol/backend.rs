//! Backend (server → client) messages that shardgate writes itself, and the
//! few it reads from servers (ReadyForQuery, ParameterStatus, ErrorResponse).

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{put_cstr, put_message};
use super::frontend::Reader;

/// Severity of an ErrorResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Ends the statement.
    Error,
    /// Ends the connection.
    Fatal,
}

impl Severity {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            Severity::Error => b"ERROR",
            Severity::Fatal => b"FATAL",
        }
    }
}

/// Appends an ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(out: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    put_message(out, b'E', |o| {
        o.put_u8(b'S');
        put_cstr(o, severity.as_bytes());
        o.put_u8(b'V');
        put_cstr(o, severity.as_bytes());
        o.put_u8(b'C');
        put_cstr(o, code.as_bytes());
        o.put_u8(b'M');
        put_cstr(o, message.as_bytes());
        o.put_u8(0);
    });
}

/// Appends a NoticeResponse (severity NOTICE).
pub fn notice_response(out: &mut BytesMut, code: &str, message: &str) {
    put_message(out, b'N', |o| {
        for (f, v) in [(b'S', &b"NOTICE"[..]), (b'V', b"NOTICE"), (b'C', code.as_bytes()), (b'M', message.as_bytes())] {
            o.put_u8(f);
            put_cstr(o, v);
        }
        o.put_u8(0);
    });
}

/// Appends ReadyForQuery with a transaction status (`I`, `T`, `E`).
pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    put_message(out, b'Z', |o| o.put_u8(status));
}

/// Appends an Authentication message: `code` then `data`.
pub fn authentication(out: &mut BytesMut, code: i32, data: &[u8]) {
    put_message(out, b'R', |o| {
        o.put_i32(code);
        o.extend_from_slice(data);
    });
}

/// Appends ParameterStatus.
pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    put_message(out, b'S', |o| {
        put_cstr(o, name.as_bytes());
        put_cstr(o, value.as_bytes());
    });
}

/// Appends BackendKeyData.
pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    put_message(out, b'K', |o| {
        o.put_i32(pid);
        o.put_i32(secret);
    });
}

/// Fields of an ErrorResponse/NoticeResponse the proxy cares about.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    /// `S` field.
    pub severity: String,
    /// `C` field (SQLSTATE).
    pub code: String,
    /// `M` field.
    pub message: String,
    /// `t` field (the table of a constraint violation).
    pub table: String,
    /// `V` field: the severity, never translated (PostgreSQL 9.6 and later).
    pub severity_v: String,
}

/// Parses ErrorResponse/NoticeResponse fields (unknown fields are skipped).
pub fn parse_error_fields(body: &[u8]) -> ErrorFields {
    let mut r = Reader::new(body);
    let mut f = ErrorFields::default();
    while let Ok(t) = r.u8() {
        if t == 0 {
            break;
        }
        let Ok(v) = r.cstr() else { break };
        let v = String::from_utf8_lossy(v).into_owned();
        match t {
            b'S' => f.severity = v,
            b'C' => f.code = v,
            b'M' => f.message = v,
            b't' => f.table = v,
            b'V' => f.severity_v = v,
            _ => {}
        }
    }
    f
}

/// Parses a ParameterStatus body.
pub fn parse_parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut r = Reader::new(body);
    let name = r.cstr().ok()?;
    let value = r.cstr().ok()?;
    Some((String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned()))
}

/// The values of a DataRow body (None for NULL); None if the body is malformed.
pub fn data_row(body: &[u8]) -> Option<Vec<Option<Bytes>>> {
    let n = i16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let mut pos = 2;
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(pos..pos + 4)?.try_into().ok()?);
        pos += 4;
        if len < 0 {
            row.push(None);
        } else {
            row.push(Some(Bytes::copy_from_slice(body.get(pos..pos + len as usize)?)));
            pos += len as usize;
        }
    }
    Some(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec::split_frame;

    #[test]
    fn error_round_trip() {
        let mut out = BytesMut::new();
        error_response(&mut out, Severity::Fatal, crate::protocol::sqlstate::INVALID_PASSWORD, "password authentication failed for user \"x\"");
        let f = split_frame(&mut out, 1 << 20).expect("ok").expect("frame");
        assert_eq!(f.tag, b'E');
        let e = parse_error_fields(f.body());
        assert_eq!((e.severity.as_str(), e.code.as_str()), ("FATAL", crate::protocol::sqlstate::INVALID_PASSWORD));
        assert_eq!(e.message, "password authentication failed for user \"x\"");
    }

    #[test]
    fn parameter_status_round_trip() {
        let mut out = BytesMut::new();
        parameter_status(&mut out, "TimeZone", "UTC");
        let f = split_frame(&mut out, 1 << 20).expect("ok").expect("frame");
        assert_eq!(parse_parameter_status(f.body()), Some(("TimeZone".into(), "UTC".into())));
    }
}
