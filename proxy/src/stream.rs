//! The byte stream of a client or server connection: a TCP socket, or — for
//! TLS — one end of an in-process socket pair whose other end a relay task
//! copies to and from the TLS session (tokio-rustls). The session code works
//! on readiness (`readable`, `try_read_buf`, `try_write`) the same way for
//! both; plaintext connections pay nothing for TLS support, TLS ones pay one
//! extra copy through the socket pair. Back-pressure is kept: a peer that
//! stops reading fills the TLS socket, then the relay stops, then the pair.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// A connection's bytes, plain or through a TLS relay.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// Our end of the socket pair a TLS relay serves.
    Tls {
        /// The socket.
        sock: UnixStream,
        /// Dropped with this end: tells the relay to finish within [`RELAY_GRACE`].
        _closed: tokio::sync::oneshot::Sender<()>,
    },
}

/// How long a relay may keep flushing to its peer after our end closed
/// (a peer that does not read would otherwise hold it, and its socket, forever).
pub const RELAY_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Stream::Tcp($s) => $e,
            Stream::Tls { sock: $s, .. } => $e,
        }
    };
}

impl Stream {
    /// True when the bytes cross the network encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls { .. })
    }
    /// Waits until a read may make progress.
    pub async fn readable(&self) -> io::Result<()> {
        each!(self, s => s.readable().await)
    }
    /// Waits until a write may make progress.
    pub async fn writable(&self) -> io::Result<()> {
        each!(self, s => s.writable().await)
    }
    /// Reads what is there without waiting (`WouldBlock` when nothing is).
    pub fn try_read_buf<B: BufMut>(&self, buf: &mut B) -> io::Result<usize> {
        each!(self, s => s.try_read_buf(buf))
    }
    /// Reads what is there without waiting, like [`Stream::try_read_buf`]; after
    /// a short read (fewer bytes than `buf` had room for: the socket is drained)
    /// it also clears the socket's read readiness, so the next `readable()` waits
    /// for new bytes instead of waking for a `recv` that would only return EAGAIN.
    ///
    /// The read runs inside `try_io`, so what is cleared is the readiness seen
    /// *before* the read: bytes that arrive after the read raise a newer
    /// readiness, which stays. (Clearing in a second `try_io` after the read, as
    /// before, cleared that newer readiness too and left those bytes unread until
    /// the peer sent more: a client waited for an answer to a message the proxy
    /// never read.)
    pub fn read_available(&self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        let spare = buf.capacity() - buf.len();
        let mut got = 0;
        let r = self.try_io(Interest::READABLE, || {
            got = self.try_read_buf(buf)?;
            if got > 0 && got < spare {
                // drained: have try_io clear the readiness it saw before the read
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(got)
            }
        });
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
            r => r,
        }
    }
    /// Reads into `buf` without waiting.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        each!(self, s => s.try_read(buf))
    }
    /// Writes what fits without waiting.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        each!(self, s => s.try_write(buf))
    }
    /// Peeks with a non-blocking `MSG_PEEK` syscall (sees a FIN or RST the runtime has not polled).
    pub fn peek(&self, buf: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<usize> {
        each!(self, s => socket2::SockRef::from(s).peek(buf))
    }
    /// Closes the socket now, leaving in its place one whose peer is gone (every
    /// read sees EOF): the peer sees the close at once, even while this value
    /// lives on (say, idle in a pool until it is recycled). Closing, not a
    /// `shutdown`, is what makes a server blocked writing to us give up.
    pub fn close_now(&mut self) {
        let placeholder = UnixStream::pair().map(|(ours, _theirs)| {
            let (closed, _) = tokio::sync::oneshot::channel();
            Stream::Tls { sock: ours, _closed: closed }
        });
        match placeholder {
            Ok(p) => drop(std::mem::replace(self, p)),
            Err(_) => {
                let _ = each!(&*self, s => socket2::SockRef::from(s).shutdown(std::net::Shutdown::Both));
            }
        }
    }
    /// Runs `f` under the socket's readiness tracking (see tokio's `try_io`).
    pub fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        each!(self, s => s.try_io(interest, f))
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Serves an established TLS session through a socket pair and returns our
/// end. When our end is dropped the relay flushes what is left and sends
/// close_notify, for at most [`RELAY_GRACE`]; then it drops the connection
/// whatever the peer does. The peer closing its side only half-closes ours,
/// as TCP would.
pub fn relay<S>(tls: S) -> io::Result<Stream>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (ours, theirs) = UnixStream::pair()?;
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut tls_r, mut tls_w) = tokio::io::split(tls);
        let (mut pair_r, mut pair_w) = theirs.into_split();
        let inbound = async {
            let _ = tokio::io::copy(&mut tls_r, &mut pair_w).await;
            let _ = pair_w.shutdown().await;
            // keep the relay until our end closes
            std::future::pending::<()>().await
        };
        let outbound = async {
            let _ = tokio::io::copy(&mut pair_r, &mut tls_w).await;
            let _ = tls_w.shutdown().await;
        };
        let deadline = async {
            // the sender is never used: it resolves (with an error) when our end is dropped
            let _ = closed_rx.await;
            tokio::time::sleep(RELAY_GRACE).await;
        };
        tokio::select! {
            () = inbound => {}
            () = outbound => {}
            () = deadline => {}
        }
    });
    Ok(Stream::Tls { sock: ours, _closed: closed_tx })
}

/// Writes all of `buf` through a shared reference to the socket.
pub(crate) async fn write_all(stream: &Stream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
