//! The PostgreSQL wire protocol by hand, for tests that must send what no
//! driver sends (malformed messages, batches of Parse/Bind/Execute, text
//! values with a declared type). Logs in as the md5 user, so no SCRAM client
//! is needed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::{Cluster, MD5_USER};

/// One message: tag, length, body.
pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A StartupMessage (protocol 3.0) with these parameters.
pub fn startup_packet(params: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v);
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

/// Parse (unnamed) with declared parameter types, Bind (unnamed portal) of
/// text-format values, Execute.
pub fn pbe_typed(sql: &str, types: &[u32], values: &[&str]) -> Vec<u8> {
    pbe_typed_rows(sql, types, values, 0)
}

/// Parse (unnamed), Bind (unnamed portal), Execute of at most `max_rows` rows
/// (0: all) of `sql` without parameters.
pub fn pbe_rows(sql: &str, max_rows: i32) -> Vec<u8> {
    pbe_typed_rows(sql, &[], &[], max_rows)
}

fn pbe_typed_rows(sql: &str, types: &[u32], values: &[&str], max_rows: i32) -> Vec<u8> {
    let mut parse = [&[0u8][..], sql.as_bytes(), &[0]].concat();
    parse.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for t in types {
        parse.extend_from_slice(&t.to_be_bytes());
    }
    let mut bind = vec![0u8, 0, 0, 0];
    bind.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for v in values {
        bind.extend_from_slice(&(v.len() as i32).to_be_bytes());
        bind.extend_from_slice(v.as_bytes());
    }
    bind.extend_from_slice(&[0, 0]);
    let execute = [&[0u8][..], &max_rows.to_be_bytes()].concat();
    [frame(b'P', &parse), frame(b'B', &bind), frame(b'E', &execute)].concat()
}

/// Parse (unnamed), Bind (unnamed portal), Execute of `sql` without parameters.
pub fn pbe(sql: &str) -> Vec<u8> {
    pbe_typed(sql, &[], &[])
}

/// Reads messages up to and including the first one with `tag`: `(tag, body)` each.
pub fn read_msgs_until(s: &mut TcpStream, tag: u8) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut hdr = [0u8; 5];
        s.read_exact(&mut hdr).expect("message header");
        let len = i32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).expect("message body");
        let done = hdr[0] == tag;
        out.push((hdr[0], body));
        if done {
            return out;
        }
    }
}

/// Reads messages up to and including ReadyForQuery: `(tag, body)` each.
pub fn read_until_ready(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    read_msgs_until(s, b'Z')
}

/// The SQLSTATE of the first ErrorResponse among `msgs`.
pub fn error_code(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
    let (_, body) = msgs.iter().find(|(t, _)| *t == b'E')?;
    body.split(|b| *b == 0).find_map(|f| f.strip_prefix(b"C")).map(|c| String::from_utf8_lossy(c).into_owned())
}

/// `md5` || md5(md5(password || user) || salt), as PostgreSQL's md5 method wants.
pub fn postgres_md5(user: &str, pw: &str, salt: [u8; 4]) -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import hashlib,sys; u,p,s=sys.argv[1],sys.argv[2],bytes.fromhex(sys.argv[3]); i=hashlib.md5((p+u).encode()).hexdigest(); print('md5'+hashlib.md5(i.encode()+s).hexdigest())", user, pw])
        .arg(salt.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .output()
        .expect("python3");
    String::from_utf8(out.stdout).expect("utf8").trim().to_string()
}

/// A raw connection to the proxy, nothing sent yet.
pub fn connect(c: &Cluster) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", c.info.proxy_port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s
}

/// A raw connection logged in as the md5 user, at its first ReadyForQuery.
pub fn md5_login(c: &Cluster) -> TcpStream {
    let mut s = connect(c);
    s.write_all(&startup_packet(&[("user", MD5_USER.0.as_bytes())])).expect("startup");
    let mut hdr = [0u8; 13];
    s.read_exact(&mut hdr).expect("md5 request");
    assert_eq!(hdr[0], b'R', "an authentication request");
    let hash = postgres_md5(MD5_USER.0, MD5_USER.1, [hdr[9], hdr[10], hdr[11], hdr[12]]);
    s.write_all(&frame(b'p', &[hash.as_bytes(), &[0]].concat())).expect("password");
    read_until_ready(&mut s);
    s
}
