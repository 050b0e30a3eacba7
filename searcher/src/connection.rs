//! The server's connections: each TCP stream is wrapped so that its request lines are
//! followed ([`crate::framing`]) and one too long for actix-http is answered 414 with the
//! error JSON, after whatever actix is still writing, instead of actix's empty 400.
//!
//! To actix, the stream ends where the too-long line begins: it finishes the requests
//! before it and closes the connection; the close writes the 414 first.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::app::{MAX_URI_BYTES, error_json};
use crate::framing::{Feed, RequestFraming};

/// The longest request line handed to actix: a request target of [`MAX_URI_BYTES`] with
/// room for any method and the version. Targets between the two are refused by the app's
/// own check, which names their length exactly.
pub const MAX_REQUEST_LINE_BYTES: usize = MAX_URI_BYTES + 64;

/// What is read and dropped, after the 414, of the rest of a too-long request, so that
/// the close does not reset the connection before the client has read the answer (the
/// server's disconnect timeout bounds the time spent).
const DRAIN_AFTER_REFUSAL: usize = 1 << 20;

/// Told once for each connection whose request line was refused (metrics).
pub type OnRefused = Arc<dyn Fn() + Send + Sync>;

/// A connection whose too-long request lines are answered 414 (see the module's comment).
pub struct GuardedStream<T> {
    inner: T,
    framing: RequestFraming,
    refusal: Option<Refusal>,
    on_refused: OnRefused,
}

/// The 414 still to be written, and how far the close has gone.
struct Refusal {
    answer: Vec<u8>,
    written: usize,
    write_side_closed: bool,
    drained: usize,
}

impl<T> GuardedStream<T> {
    pub fn new(inner: T, on_refused: OnRefused) -> Self {
        Self { inner, framing: RequestFraming::new(MAX_REQUEST_LINE_BYTES), refusal: None, on_refused }
    }

    /// The stream itself (the socket probe of [`crate::client`] duplicates it).
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

/// The whole answer to a too-long request line.
fn uri_too_long_answer() -> Vec<u8> {
    let message = format!("the request line is over {MAX_REQUEST_LINE_BYTES} bytes; a request target may be at most {MAX_URI_BYTES} bytes");
    let body = error_json("uri_too_long", &message).to_string();
    let head = format!("HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
    [head.into_bytes(), body.into_bytes()].concat()
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedStream<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refusal.is_some() {
            // The end of the stream, as far as actix is concerned.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Feed::TooLong { keep } = this.framing.feed(&buf.filled()[before..]) {
            buf.set_filled(before + keep);
            this.refusal = Some(Refusal { answer: uri_too_long_answer(), written: 0, write_side_closed: false, drained: 0 });
            (this.on_refused)();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GuardedStream<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    /// actix closes the connection once it has written everything; a refusal's answer goes
    /// out then, after its last response.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(refusal) = &mut this.refusal else { return Pin::new(&mut this.inner).poll_shutdown(cx) };
        let inner = &mut this.inner;
        while refusal.written < refusal.answer.len() {
            let n = ready!(Pin::new(&mut *inner).poll_write(cx, &refusal.answer[refusal.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            refusal.written += n;
        }
        if !refusal.write_side_closed {
            ready!(Pin::new(&mut *inner).poll_flush(cx))?;
            ready!(Pin::new(&mut *inner).poll_shutdown(cx))?;
            refusal.write_side_closed = true;
        }
        let mut scratch = [0u8; 8192];
        while refusal.drained < DRAIN_AFTER_REFUSAL {
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut *inner).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => refusal.drained += buf.filled().len(),
                // The client has finished sending, or is gone: either way, done.
                _ => break,
            }
        }
        Poll::Ready(Ok(()))
    }
}
