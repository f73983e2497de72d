//! PostgreSQL protocol v3 pieces shardgate needs: frame splitting ([`codec`]),
//! the few frontend messages it must look inside ([`frontend`]) and the
//! messages it writes itself ([`backend`]).
//! See <https://www.postgresql.org/docs/15/protocol-message-formats.html>.

pub mod backend;
pub mod codec;
pub mod frontend;
pub mod sqlstate;

/// Feeds arbitrary client bytes through everything that decodes client input
/// (startup packet, frame splitting, the messages we look inside). The fuzz
/// target and a property test call it; it must never panic.
pub fn decode_client_bytes(data: &[u8], max_message: usize) {
    use bytes::BytesMut;
    let mut buf = BytesMut::from(data);
    if let Ok(Some(pkt)) = codec::split_startup(&mut buf, 10_000) {
        let _ = frontend::parse_startup(&pkt);
    }
    while let Ok(Some(f)) = codec::split_frame(&mut buf, max_message) {
        match f.tag {
            b'P' => {
                if let Ok(p) = frontend::Parse::parse(f.body()) {
                    let mut out = BytesMut::new();
                    p.write_renamed(&mut out, b"sg_x");
                }
            }
            b'B' => {
                if let Ok(b) = frontend::Bind::parse(f.body()) {
                    let mut out = BytesMut::new();
                    b.write_renamed(&mut out, b"sg_x");
                }
            }
            b'D' | b'C' => {
                let _ = frontend::Target::parse(f.body());
            }
            b'p' => {
                let _ = frontend::SaslInitial::parse(f.body());
            }
            b'E' | b'N' => {
                let _ = backend::parse_error_fields(f.body());
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoding_client_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            super::decode_client_bytes(&data, 256);
        }
    }
}
