//! TLS settings built from the config, with rustls (ring): the certificate
//! the proxy presents to its clients, and how its connections to PostgreSQL
//! verify the server (libpq's `sslmode` semantics).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::SslMode;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The proxy's server side: certificate chain and key from PEM files.
pub fn server_config(cert_file: &str, key_file: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("reading certificates from `{cert_file}`: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("reading certificates from `{cert_file}`: {e}"))?;
    if certs.is_empty() {
        return Err(format!("`{cert_file}` holds no PEM certificate"));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| format!("reading the private key from `{key_file}`: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("`{cert_file}` and `{key_file}` do not make a usable certificate: {e}"))?;
    Ok(Arc::new(config))
}

/// The first certificate of a PEM file, DER-encoded (the proxy's own, for
/// channel binding).
pub fn first_certificate(path: &str) -> Result<Vec<u8>, String> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("reading certificates from `{path}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{path}` holds no PEM certificate"))?
        .map(|c| c.as_ref().to_vec())
        .map_err(|e| format!("reading certificates from `{path}`: {e}"))
}

/// The CA certificates in a PEM file.
pub fn root_store(path: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| format!("reading CA certificates from `{path}`: {e}"))?;
    for c in certs {
        let c = c.map_err(|e| format!("reading CA certificates from `{path}`: {e}"))?;
        roots.add(c).map_err(|e| format!("CA certificate in `{path}`: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("`{path}` holds no PEM certificate"));
    }
    Ok(roots)
}

/// Client side of a connection to PostgreSQL for `mode` (not `Disable`):
/// `Prefer` and `Require` without a root certificate accept any certificate
/// (encryption only, as libpq); with one, and `VerifyCa`, the chain is
/// checked; `VerifyFull` checks the chain and the host name.
pub fn client_config(mode: SslMode, rootcert: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, rootcert) {
        (SslMode::Disable, _) => return Err("sslmode=disable has no TLS settings".into()),
        (SslMode::Prefer | SslMode::Require, None) => Arc::new(EncryptOnly(provider())),
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => return Err("sslmode verify-ca and verify-full need sslrootcert".into()),
        (mode, Some(path)) => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(path)?), provider()).build().map_err(|e| e.to_string())?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    Ok(Arc::new(builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth()))
}

/// The name a certificate is checked against: an IP address or a DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string()).map_err(|e| format!("`{host}` is not a host name or IP address usable for TLS: {e}"))
}

/// Accepts any certificate but still checks the handshake signatures.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Checks the chain up to the configured CA, not the host name (libpq's verify-ca).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a server certificate for `san` (scripts/gen_certs.sh, openssl).
    fn certs(dir: &std::path::Path, san: &str) -> (String, String, String) {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gen_certs.sh");
        let ok = std::process::Command::new("bash").arg(script).arg(dir).args(["2", san]).status().expect("bash").success();
        assert!(ok, "gen_certs.sh");
        let p = |f: &str| dir.join(f).display().to_string();
        (p("ca.crt"), p("server.crt"), p("server.key"))
    }

    /// A whole handshake in memory; the client's error if it refuses.
    fn handshake(client: Arc<rustls::ClientConfig>, server: Arc<rustls::ServerConfig>, host: &str) -> Result<(), rustls::Error> {
        let mut c = rustls::ClientConnection::new(client, server_name(host).expect("name"))?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).expect("write");
            }
            s.read_tls(&mut &buf[..]).expect("read");
            if s.process_new_packets().is_err() {
                break;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).expect("write");
            }
            c.read_tls(&mut &buf[..]).expect("read");
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General("handshake did not finish".into()))
    }

    #[test]
    fn sslmodes_verify_as_libpq_does() {
        let tmp = std::env::temp_dir().join(format!("shardgate-tls-test-{}", std::process::id()));
        let (ca, crt, key) = certs(&tmp.join("a"), "DNS:db.internal");
        let (other_ca, _, _) = certs(&tmp.join("b"), "DNS:db.internal");
        let server = server_config(&crt, &key).expect("server config");
        let cfg = |mode, root: Option<&str>| client_config(mode, root).expect("client config");
        // verify-full: chain and name
        assert!(handshake(cfg(SslMode::VerifyFull, Some(&ca)), server.clone(), "db.internal").is_ok());
        let e = handshake(cfg(SslMode::VerifyFull, Some(&ca)), server.clone(), "127.0.0.1").expect_err("name mismatch");
        assert!(matches!(e, rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })), "{e:?}");
        assert!(handshake(cfg(SslMode::VerifyFull, Some(&other_ca)), server.clone(), "db.internal").is_err(), "another CA");
        // verify-ca, and require/prefer with a CA: the chain, not the name
        for mode in [SslMode::VerifyCa, SslMode::Require, SslMode::Prefer] {
            assert!(handshake(cfg(mode, Some(&ca)), server.clone(), "127.0.0.1").is_ok(), "{mode:?}: the name is not checked");
            assert!(handshake(cfg(mode, Some(&other_ca)), server.clone(), "127.0.0.1").is_err(), "{mode:?}: the chain is");
        }
        // require/prefer without a CA: encryption only
        for mode in [SslMode::Require, SslMode::Prefer] {
            assert!(handshake(cfg(mode, None), server.clone(), "127.0.0.1").is_ok(), "{mode:?}");
        }
        assert!(client_config(SslMode::VerifyCa, None).is_err());
        assert!(client_config(SslMode::Disable, None).is_err());
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
