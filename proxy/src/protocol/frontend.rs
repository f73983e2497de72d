//! The frontend (client → server) messages shardgate looks inside. Everything
//! else is forwarded as raw bytes. Every parser is bounds-checked: malformed
//! input yields `ProtocolError`, never a panic.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{put_cstr, put_message};

/// Protocol version 3.0 in a StartupMessage.
pub const PROTOCOL_V3: i32 = 196_608;
/// Request code of an SSLRequest.
pub const SSL_REQUEST: i32 = 80_877_103;
/// Request code of a GSSENCRequest.
pub const GSSENC_REQUEST: i32 = 80_877_104;
/// Request code of a CancelRequest.
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// A malformed message from the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub &'static str);

/// The first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// Client asks for TLS.
    SslRequest,
    /// Client asks for GSSAPI encryption.
    GssEncRequest,
    /// Out-of-band cancel of the query running on session `pid`.
    Cancel {
        /// Process id from BackendKeyData.
        pid: i32,
        /// Secret key from BackendKeyData.
        secret: i32,
    },
    /// A normal StartupMessage.
    Startup {
        /// Protocol version requested.
        version: i32,
        /// Name/value pairs (`user`, `database`, GUCs ...).
        params: Vec<(String, String)>,
    },
}

/// A cursor over a message body.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    /// Reads a big-endian i32.
    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        let (head, rest) = self.buf.split_at_checked(4).ok_or(ProtocolError("message too short"))?;
        self.buf = rest;
        Ok(i32::from_be_bytes([head[0], head[1], head[2], head[3]]))
    }
    /// Reads a big-endian i16.
    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        let (head, rest) = self.buf.split_at_checked(2).ok_or(ProtocolError("message too short"))?;
        self.buf = rest;
        Ok(i16::from_be_bytes([head[0], head[1]]))
    }
    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        let (&b, rest) = self.buf.split_first().ok_or(ProtocolError("message too short"))?;
        self.buf = rest;
        Ok(b)
    }
    /// Reads a NUL-terminated string (bytes without the NUL).
    pub fn cstr(&mut self) -> Result<&'a [u8], ProtocolError> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or(ProtocolError("missing string terminator"))?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
    /// Reads `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let (head, rest) = self.buf.split_at_checked(n).ok_or(ProtocolError("message too short"))?;
        self.buf = rest;
        Ok(head)
    }
    /// What is left.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }
}

fn utf8(b: &[u8]) -> Result<String, ProtocolError> {
    std::str::from_utf8(b).map(str::to_owned).map_err(|_| ProtocolError("invalid UTF-8 in startup packet"))
}

/// Parses the body of a startup-phase packet (after the length).
pub fn parse_startup(body: &[u8]) -> Result<StartupPacket, ProtocolError> {
    let mut r = Reader::new(body);
    let code = r.i32()?;
    match code {
        SSL_REQUEST => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST => Ok(StartupPacket::Cancel { pid: r.i32()?, secret: r.i32()? }),
        version => {
            let mut params = Vec::new();
            loop {
                let name = r.cstr()?;
                if name.is_empty() {
                    break;
                }
                let value = r.cstr()?;
                params.push((utf8(name)?, utf8(value)?));
                if params.len() > 64 {
                    return Err(ProtocolError("too many startup parameters"));
                }
            }
            Ok(StartupPacket::Startup { version, params })
        }
    }
}

/// A Parse message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    /// Prepared statement name (empty = unnamed).
    pub name: &'a [u8],
    /// Query text.
    pub query: &'a [u8],
    /// Everything after the query: parameter count and type OIDs, verbatim.
    pub param_types: &'a [u8],
}

impl<'a> Parse<'a> {
    /// Parses a Parse body.
    #[allow(clippy::self_named_constructors)] // the message is called Parse; `parse` parses it
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(body);
        let name = r.cstr()?;
        let query = r.cstr()?;
        let param_types = r.rest();
        let mut t = Reader::new(param_types);
        let n = t.i16()?;
        if n < 0 || t.rest().len() != n as usize * 4 {
            return Err(ProtocolError("invalid parameter type list in Parse"));
        }
        Ok(Parse { name, query, param_types })
    }

    /// Writes this Parse under another statement name.
    pub fn write_renamed(&self, out: &mut BytesMut, name: &[u8]) {
        put_message(out, b'P', |o| {
            put_cstr(o, name);
            put_cstr(o, self.query);
            o.extend_from_slice(self.param_types);
        });
    }
}

/// The part of a Bind message the proxy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    /// Destination portal.
    pub portal: &'a [u8],
    /// Source prepared statement.
    pub statement: &'a [u8],
    /// Formats, parameter values and result formats, verbatim.
    pub rest: &'a [u8],
}

impl<'a> Bind<'a> {
    /// Parses the head of a Bind body; the rest is kept verbatim.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(body);
        let portal = r.cstr()?;
        let statement = r.cstr()?;
        Ok(Bind { portal, statement, rest: r.rest() })
    }

    /// Writes this Bind naming another statement.
    pub fn write_renamed(&self, out: &mut BytesMut, statement: &[u8]) {
        put_message(out, b'B', |o| {
            put_cstr(o, self.portal);
            put_cstr(o, statement);
            o.extend_from_slice(self.rest);
        });
    }
}

/// Describe or Close target: `S` statement or `P` portal plus a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    /// `b'S'` or `b'P'`.
    pub kind: u8,
    /// Statement or portal name.
    pub name: &'a [u8],
}

impl<'a> Target<'a> {
    /// Parses a Describe or Close body.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(body);
        let kind = r.u8()?;
        if kind != b'S' && kind != b'P' {
            return Err(ProtocolError("invalid DESCRIBE/CLOSE message subtype"));
        }
        let name = r.cstr()?;
        if !r.rest().is_empty() {
            return Err(ProtocolError("trailing bytes in DESCRIBE/CLOSE message"));
        }
        Ok(Target { kind, name })
    }

    /// Writes a Describe (`tag = b'D'`) or Close (`b'C'`) with another name.
    pub fn write_renamed(&self, out: &mut BytesMut, tag: u8, name: &[u8]) {
        put_message(out, tag, |o| {
            o.put_u8(self.kind);
            put_cstr(o, name);
        });
    }
}

/// Writes a Close of the prepared statement `name`.
pub fn close_statement(out: &mut BytesMut, name: &[u8]) {
    Target { kind: b'S', name: b"" }.write_renamed(out, b'C', name);
}

/// A SASLInitialResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslInitial<'a> {
    /// Mechanism chosen by the client.
    pub mechanism: &'a [u8],
    /// Client-first message.
    pub data: &'a [u8],
}

impl<'a> SaslInitial<'a> {
    /// Parses a SASLInitialResponse body.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(body);
        let mechanism = r.cstr()?;
        let len = r.i32()?;
        let data = if len < 0 { &[][..] } else { r.bytes(len as usize)? };
        Ok(SaslInitial { mechanism, data })
    }
}

/// Builds a Query message (used for the proxy's own statements).
pub fn query(sql: &str) -> Bytes {
    let mut out = BytesMut::new();
    put_message(&mut out, b'Q', |o| put_cstr(o, sql.as_bytes()));
    out.freeze()
}

/// The one statement that applies a session parameter: name and value are bind
/// parameters; a NULL value resets the parameter to its session default.
pub const SET_CONFIG_SQL: &str = "SELECT pg_catalog.set_config($1, coalesce($2, \
     (SELECT s.reset_val FROM pg_catalog.pg_settings s WHERE lower(s.name) = lower($1))), false)";

/// Parse of [`SET_CONFIG_SQL`], then Bind/Execute per `(name, value)` and a
/// Sync: session parameters applied without any client text in SQL. Empty for
/// no changes.
pub fn set_config_pipeline(changes: &[(&str, Option<&str>)]) -> Bytes {
    config_pipeline(SET_CONFIG_SQL, changes)
}

/// [`SET_CONFIG_SQL`] for the current transaction only (`SET LOCAL`).
pub const SET_LOCAL_CONFIG_SQL: &str = "SELECT pg_catalog.set_config($1, coalesce($2, \
     (SELECT s.reset_val FROM pg_catalog.pg_settings s WHERE lower(s.name) = lower($1))), true)";

/// Like [`set_config_pipeline`], for the open transaction block only (a
/// client's `SET LOCAL`, repeated on each shard of the block).
pub fn set_local_config_pipeline(changes: &[(&str, Option<&str>)]) -> Bytes {
    config_pipeline(SET_LOCAL_CONFIG_SQL, changes)
}

fn config_pipeline(sql: &str, changes: &[(&str, Option<&str>)]) -> Bytes {
    let mut out = BytesMut::new();
    if changes.is_empty() {
        return out.freeze();
    }
    put_message(&mut out, b'P', |o| {
        put_cstr(o, b"");
        put_cstr(o, sql.as_bytes());
        o.put_i16(2);
        o.put_u32(25);
        o.put_u32(25);
    });
    for (name, value) in changes {
        put_message(&mut out, b'B', |o| {
            put_cstr(o, b"");
            put_cstr(o, b"");
            o.put_i16(0);
            o.put_i16(2);
            o.put_i32(name.len() as i32);
            o.extend_from_slice(name.as_bytes());
            match value {
                Some(v) => {
                    o.put_i32(v.len() as i32);
                    o.extend_from_slice(v.as_bytes());
                }
                None => o.put_i32(-1),
            }
            o.put_i16(0);
        });
        put_message(&mut out, b'E', |o| {
            put_cstr(o, b"");
            o.put_i32(0);
        });
    }
    put_message(&mut out, b'S', |_| {});
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec::split_frame;
    use proptest::prelude::*;

    #[test]
    fn startup_params_and_bad_utf8() {
        let mut body = PROTOCOL_V3.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app\0database\0db\0\0");
        assert_eq!(
            parse_startup(&body),
            Ok(StartupPacket::Startup { version: PROTOCOL_V3, params: vec![("user".into(), "app".into()), ("database".into(), "db".into())] })
        );
        let mut body = PROTOCOL_V3.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0\xff\xfe\0\0");
        assert_eq!(parse_startup(&body), Err(ProtocolError("invalid UTF-8 in startup packet")));
        let mut body = PROTOCOL_V3.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app");
        assert!(parse_startup(&body).is_err());
    }

    #[test]
    fn parse_bind_describe_close_round_trip_with_rename() {
        let mut out = BytesMut::new();
        put_message(&mut out, b'P', |o| {
            put_cstr(o, b"s1");
            put_cstr(o, b"select $1");
            o.put_i16(1);
            o.put_i32(23);
        });
        let f = split_frame(&mut out, 1 << 20).expect("ok").expect("frame");
        let p = Parse::parse(f.body()).expect("parse");
        assert_eq!((p.name, p.query), (&b"s1"[..], &b"select $1"[..]));
        let mut re = BytesMut::new();
        p.write_renamed(&mut re, b"sg_1");
        let f2 = split_frame(&mut re, 1 << 20).expect("ok").expect("frame");
        let p2 = Parse::parse(f2.body()).expect("parse");
        assert_eq!((p2.name, p2.query, p2.param_types), (&b"sg_1"[..], p.query, p.param_types));

        let b = Bind { portal: b"", statement: b"s1", rest: b"\0\0\0\0\0\0" };
        let mut re = BytesMut::new();
        b.write_renamed(&mut re, b"sg_1");
        let f = split_frame(&mut re, 1 << 20).expect("ok").expect("frame");
        let b2 = Bind::parse(f.body()).expect("bind");
        assert_eq!((b2.statement, b2.rest), (&b"sg_1"[..], b.rest));

        assert_eq!(Target::parse(b"Ss1\0"), Ok(Target { kind: b'S', name: b"s1" }));
        assert!(Target::parse(b"Xs1\0").is_err());
        assert!(Parse::parse(b"s\0q\0\0\x02\0\0\0\x17").is_err(), "declared 2 types, gave 1");
    }

    proptest! {
        #[test]
        fn parsers_never_panic(body in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse_startup(&body);
            let _ = Parse::parse(&body);
            let _ = Bind::parse(&body);
            let _ = Target::parse(&body);
            let _ = SaslInitial::parse(&body);
        }
    }
}
