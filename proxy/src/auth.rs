//! Client authentication, server side: SCRAM-SHA-256 (RFC 5802/7677, as
//! PostgreSQL does it, no channel binding) and md5. Pure state machines; the
//! session drives the messages. Crypto primitives come from hmac/sha2/md-5.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};
use shardgate_config::{AuthMethod, UserConfig};

/// Why authentication failed. Clients only ever see "password authentication failed".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Malformed SCRAM message.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// Proof or password did not match.
    #[error("password does not match")]
    Mismatch,
    /// Channel binding asked for where it is not offered, refused where it
    /// is, or of another type than `tls-server-end-point`.
    #[error("SCRAM channel binding negotiation error")]
    ChannelBinding,
}

/// The `tls-server-end-point` channel binding data of a certificate (RFC
/// 5929): its hash with the hash of its signature algorithm (SHA-256 for
/// SHA-1 and SHA-256 signatures), as PostgreSQL computes it. `None` for
/// algorithms without one (Ed25519, RSASSA-PSS).
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    // signatureAlgorithm OIDs, DER-encoded; the first one in the certificate is
    // the TBSCertificate's `signature`, which must equal the outer one
    const ALGORITHMS: [(&[u8], u16); 8] = [
        (&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02], 256), // ecdsa-with-SHA256
        (&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03], 384), // ecdsa-with-SHA384
        (&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04], 512), // ecdsa-with-SHA512
        (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b], 256), // sha256WithRSAEncryption
        (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], 384), // sha384WithRSAEncryption
        (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], 512), // sha512WithRSAEncryption
        (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05], 256), // sha1WithRSAEncryption
        (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a], 0),   // RSASSA-PSS: hash in its parameters
    ];
    let first = ALGORITHMS
        .iter()
        .filter_map(|(oid, bits)| {
            let mut tagged = vec![0x06, oid.len() as u8];
            tagged.extend_from_slice(oid);
            cert_der.windows(tagged.len()).position(|w| w == tagged.as_slice()).map(|at| (at, *bits))
        })
        .min_by_key(|(at, _)| *at)?;
    match first.1 {
        256 => Some(Sha256::digest(cert_der).to_vec()),
        384 => Some(sha2::Sha384::digest(cert_der).to_vec()),
        512 => Some(sha2::Sha512::digest(cert_der).to_vec()),
        _ => None,
    }
}

/// A stored SCRAM-SHA-256 secret (as in `pg_authid.rolpassword`).
#[derive(Clone)]
pub struct ScramSecret {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl ScramSecret {
    /// Derives a secret with a random salt from a plain password.
    pub fn from_password(password: &str) -> ScramSecret {
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Self::parse(&verifier).expect("postgres-protocol produces a well-formed verifier")
    }

    /// Parses `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(verifier: &str) -> Option<ScramSecret> {
        let rest = verifier.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramSecret {
            iterations: iter.parse().ok().filter(|&i| i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// A secret no password matches, for an unknown user: its salt is the
    /// same at every attempt for that name (HMAC of the name under `key`, one
    /// per process), with the iterations of a real secret, so an unknown user
    /// is indistinguishable from a known one with a wrong password (as
    /// PostgreSQL's mock authentication does).
    pub fn mock(user: &str, key: &[u8; 32]) -> ScramSecret {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(b"shardgate mock salt\0");
        mac.update(user.as_bytes());
        let salt = mac.finalize().into_bytes()[..16].to_vec();
        ScramSecret { iterations: 4096, salt, stored_key: [0; 32], server_key: [0; 32] }
    }
}

/// Secrets for one configured user, precomputed at start.
#[derive(Clone)]
pub struct UserSecret {
    /// Method the user must authenticate with.
    pub method: AuthMethod,
    /// SCRAM secret, when the method is SCRAM.
    pub scram: Option<ScramSecret>,
    /// `md5(password || user)` in hex, when the method is md5.
    pub md5: Option<String>,
    /// May run admin commands.
    pub admin: bool,
}

impl UserSecret {
    /// Builds the secret from a config entry (plain password, verifier or md5 hash).
    pub fn from_config(u: &UserConfig, default_method: AuthMethod) -> UserSecret {
        let method = u.auth_method.unwrap_or(default_method);
        let (scram, md5) = match method {
            AuthMethod::ScramSha256 => {
                let s = ScramSecret::parse(&u.password).unwrap_or_else(|| ScramSecret::from_password(&u.password));
                (Some(s), None)
            }
            AuthMethod::Md5 => {
                let h = if shardgate_config::is_md5_hash(&u.password) {
                    u.password[3..].to_ascii_lowercase()
                } else {
                    md5_hex(&[u.password.as_bytes(), u.name.as_bytes()])
                };
                (None, Some(h))
            }
        };
        UserSecret { method, scram, md5, admin: u.admin }
    }
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter().fold(String::with_capacity(b.len() * 2), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks an md5 PasswordMessage payload (`md5` + hex) against the stored hash.
pub fn verify_md5(stored_hex: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let expected = format!("md5{}", md5_hex(&[stored_hex.as_bytes(), &salt]));
    constant_time_eq(expected.as_bytes(), response)
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// The server side of one SCRAM exchange, after the client-first message.
pub struct ScramServer {
    secret: ScramSecret,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    /// The expected c= attribute: the gs2 header, and the binding data with PLUS.
    channel: Vec<u8>,
}

impl ScramServer {
    /// Takes the client-first message; returns the exchange and the server-first
    /// message. `plus` is the channel binding data when the client chose
    /// SCRAM-SHA-256-PLUS; `offered` says whether PLUS was offered (over TLS).
    pub fn start(secret: ScramSecret, client_first: &[u8], plus: Option<&[u8]>, offered: bool) -> Result<(ScramServer, String), AuthError> {
        let msg = std::str::from_utf8(client_first).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        // gs2-header = flag "," [authzid] ","
        let mut parts = msg.splitn(3, ',');
        let flag = parts.next().ok_or(AuthError::Malformed("no gs2 header"))?;
        let authzid = parts.next().ok_or(AuthError::Malformed("no gs2 header"))?;
        let bare = parts.next().ok_or(AuthError::Malformed("no client-first-bare"))?;
        let gs2_header = format!("{flag},{authzid},");
        // what the client-final message's c= must hold
        let channel = match (flag, plus) {
            ("p=tls-server-end-point", Some(data)) => [gs2_header.as_bytes(), data].concat(),
            // PLUS chosen without binding, or binding without PLUS, or another type
            (f, _) if f.starts_with("p=") => return Err(AuthError::ChannelBinding),
            (_, Some(_)) => return Err(AuthError::ChannelBinding),
            // "y": the client could bind but thinks we cannot; we offered it, so
            // someone removed it on the way (RFC 5802 downgrade protection)
            ("y", None) if offered => return Err(AuthError::ChannelBinding),
            ("n" | "y", None) => gs2_header.as_bytes().to_vec(),
            _ => return Err(AuthError::Malformed("bad gs2 flag")),
        };
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(AuthError::Malformed("no client nonce"))?;
        let mut raw = [0u8; 18];
        rand::Rng::fill(&mut rand::thread_rng(), &mut raw[..]);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&secret.salt), secret.iterations);
        Ok((ScramServer { secret, client_first_bare: bare.to_string(), server_first: server_first.clone(), nonce, channel }, server_first))
    }

    /// Takes the client-final message; on success returns the server-final message.
    pub fn finish(self, client_final: &[u8]) -> Result<String, AuthError> {
        let msg = std::str::from_utf8(client_final).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(AuthError::Malformed("no proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let channel = B64.decode(channel.ok_or(AuthError::Malformed("no channel binding attribute"))?).map_err(|_| AuthError::Malformed("bad c="))?;
        if !constant_time_eq(&channel, &self.channel) {
            return Err(AuthError::Malformed("channel binding does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(AuthError::Malformed("nonce does not match"));
        }
        let proof = B64.decode(proof).map_err(|_| AuthError::Malformed("bad proof encoding"))?;
        if proof.len() != 32 {
            return Err(AuthError::Malformed("bad proof length"));
        }
        let auth_message = format!("{},{},{}", self.client_first_bare, self.server_first, without_proof);
        let client_signature = hmac(&self.secret.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(client_signature).map(|(p, s)| p ^ s).collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        if !constant_time_eq(&stored, &self.secret.stored_key) {
            return Err(AuthError::Mismatch);
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(stored_password: &str, client_password: &str) -> Result<(), AuthError> {
        exchange_bound(stored_password, client_password, ChannelBinding::unsupported(), None, false)
    }

    fn exchange_bound(stored: &str, password: &str, binding: ChannelBinding, plus: Option<&[u8]>, offered: bool) -> Result<(), AuthError> {
        let secret = ScramSecret::from_password(stored);
        let mut client = ScramSha256::new(password.as_bytes(), binding);
        let (server, server_first) = ScramServer::start(secret, client.message(), plus, offered)?;
        client.update(server_first.as_bytes()).map_err(|_| AuthError::Malformed("client rejected server-first"))?;
        let server_final = server.finish(client.message())?;
        client.finish(server_final.as_bytes()).map_err(|_| AuthError::Malformed("client rejected server signature"))
    }

    #[test]
    fn scram_accepts_right_password_and_client_verifies_server() {
        assert_eq!(exchange("s3cret", "s3cret"), Ok(()));
    }

    #[test]
    fn scram_rejects_wrong_password() {
        assert_eq!(exchange("s3cret", "guess"), Err(AuthError::Mismatch));
    }

    #[test]
    fn scram_rejects_channel_binding_where_not_offered_and_garbage() {
        let s = ScramSecret::mock("nobody", &[7; 32]);
        assert!(matches!(ScramServer::start(s.clone(), b"p=tls-server-end-point,,n=,r=abc", None, false), Err(AuthError::ChannelBinding)));
        assert!(ScramServer::start(s.clone(), b"", None, false).is_err());
        assert!(ScramServer::start(s.clone(), b"n,,n=", None, false).is_err());
        let (srv, _) = ScramServer::start(s, b"n,,n=,r=abc", None, false).expect("start");
        assert!(srv.finish(b"c=biws,r=wrong,p=AAAA").is_err());
    }

    #[test]
    fn scram_plus_checks_the_binding_and_refuses_a_downgrade() {
        let ours = [9u8; 32];
        let bound = |data: &[u8]| ChannelBinding::tls_server_end_point(data.to_vec());
        // the client saw our certificate: accepted
        assert_eq!(exchange_bound("pw", "pw", bound(&ours), Some(&ours), true), Ok(()));
        // a man in the middle's certificate: the binding differs
        assert!(exchange_bound("pw", "pw", bound(&[1u8; 32]), Some(&ours), true).is_err());
        // "y" (could bind, thinks we cannot) although we offered PLUS: stripped on the way
        assert_eq!(exchange_bound("pw", "pw", ChannelBinding::unrequested(), None, true), Err(AuthError::ChannelBinding));
        // "n" (no binding at all) stays allowed, as in PostgreSQL
        assert_eq!(exchange_bound("pw", "pw", ChannelBinding::unsupported(), None, true), Ok(()));
    }

    #[test]
    fn verifier_from_config_is_used_verbatim() {
        let v = postgres_protocol::password::scram_sha_256(b"pw");
        assert!(ScramSecret::parse(&v).is_some());
        assert!(ScramSecret::parse("SCRAM-SHA-256$0:AA==$AA==:AA==").is_none());
    }

    #[test]
    fn md5_matches_libpq() {
        let salt = [1, 2, 3, 4];
        let user = UserConfig { name: "app".into(), password: "pw".into(), password_env: None, password_file: None, auth_method: Some(AuthMethod::Md5), admin: false };
        let s = UserSecret::from_config(&user, AuthMethod::ScramSha256);
        let client = postgres_protocol::authentication::md5_hash(b"app", b"pw", salt);
        assert!(verify_md5(s.md5.as_deref().expect("md5"), salt, client.as_bytes()));
        let wrong = postgres_protocol::authentication::md5_hash(b"app", b"px", salt);
        assert!(!verify_md5(s.md5.as_deref().expect("md5"), salt, wrong.as_bytes()));
        // stored as an md5 hash gives the same result
        let hashed = UserConfig { password: postgres_protocol::password::md5(b"pw", "app"), ..user };
        let s2 = UserSecret::from_config(&hashed, AuthMethod::Md5);
        assert!(verify_md5(s2.md5.as_deref().expect("md5"), salt, client.as_bytes()));
    }
}
