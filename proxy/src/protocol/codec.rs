//! Frame splitting. A frame is one whole message (tag, length, body) taken out
//! of a read buffer; the length prefix is checked against a maximum before any
//! allocation, so a hostile length can never make us reserve memory.

use bytes::{Buf, Bytes, BytesMut};

/// A complete protocol message with its tag and length prefix, ready to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Message type byte (`Q`, `P`, `D`, ...).
    pub tag: u8,
    /// The whole message as received: tag, 4-byte length, body.
    pub raw: Bytes,
}

impl Frame {
    /// The message body (after tag and length).
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// Why a frame could not be taken from the buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Length prefix larger than the configured maximum.
    #[error("message of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// Length prefix smaller than the length field itself.
    #[error("invalid message length {0}")]
    BadLength(i64),
}

/// The whole length (tag included) of the tagged message that starts `buf`,
/// once its 5-byte header is there; `Ok(None)` before. The length prefix is
/// checked against `max` here, before anyone reserves room for it.
pub fn frame_total(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength(len as i64));
    }
    let len = len as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Some(len + 1))
}

/// Takes one tagged message from `buf`; `Ok(None)` until a whole one is buffered.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    let Some(total) = frame_total(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < total {
        // reserve at most what the (already bounded) frame still needs
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let raw = buf.split_to(total).freeze();
    Ok(Some(Frame { tag: raw[0], raw }))
}

/// A whole tagged message borrowed from a read buffer (see [`Frame`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    /// Message type byte.
    pub tag: u8,
    /// The whole message: tag, 4-byte length, body.
    pub raw: &'a [u8],
}

impl FrameRef<'_> {
    /// The message body (after tag and length).
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// Takes an untagged startup-phase packet (StartupMessage, SSLRequest,
/// GSSENCRequest, CancelRequest): returns its body after the length.
pub fn split_startup(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(FrameError::BadLength(len as i64));
    }
    let len = len as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let mut pkt = buf.split_to(len);
    pkt.advance(4);
    Ok(Some(pkt.freeze()))
}

/// Appends a message with `tag` and a body written by `f`, fixing up the length.
pub fn put_message(out: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    out.extend_from_slice(&[tag, 0, 0, 0, 0]);
    let start = out.len() - 4;
    f(out);
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a NUL-terminated string.
pub fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    out.extend_from_slice(s);
    out.extend_from_slice(&[0]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn waits_for_whole_frame() {
        let mut b = BytesMut::from(&b"Q\0\0\0\x09sel"[..]);
        assert_eq!(split_frame(&mut b, 1024), Ok(None));
        b.extend_from_slice(b"1\0");
        let f = split_frame(&mut b, 1024).expect("ok").expect("frame");
        assert_eq!(f.tag, b'Q');
        assert_eq!(f.body(), b"sel1\0");
        assert!(b.is_empty());
    }

    #[test]
    fn oversize_refused_before_allocating() {
        let mut b = BytesMut::from(&b"Q\x7f\xff\xff\xff"[..]);
        let cap = b.capacity();
        assert_eq!(split_frame(&mut b, 1 << 20), Err(FrameError::TooLarge { len: 0x7fff_ffff, max: 1 << 20 }));
        assert_eq!(b.capacity(), cap);
        let mut b = BytesMut::from(&b"Q\xff\xff\xff\xff"[..]);
        assert_eq!(split_frame(&mut b, 1 << 20), Err(FrameError::BadLength(-1)));
        let mut b = BytesMut::from(&b"Q\0\0\0\x03"[..]);
        assert_eq!(split_frame(&mut b, 1 << 20), Err(FrameError::BadLength(3)));
    }

    #[test]
    fn startup_packet() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f][..]);
        assert_eq!(split_startup(&mut b, 10_000).expect("ok").as_deref(), Some(&[0x04, 0xd2, 0x16, 0x2f][..]));
        let mut b = BytesMut::from(&[0u8, 0, 0, 7][..]);
        assert!(split_startup(&mut b, 10_000).is_err());
    }

    proptest! {
        #[test]
        fn put_then_split_round_trips(tag in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut out = BytesMut::new();
            put_message(&mut out, tag, |o| o.extend_from_slice(&body));
            let f = split_frame(&mut out, 1 << 20).expect("ok").expect("frame");
            prop_assert_eq!(f.tag, tag);
            prop_assert_eq!(f.body(), &body[..]);
        }

        #[test]
        fn split_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut b = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = split_frame(&mut b, 1024) {}
            let mut b = BytesMut::from(&bytes[..]);
            let _ = split_startup(&mut b, 1024);
        }
    }
}
