//! Knowing whether the client of a request is still there. actix keeps polling a handler
//! after its client has closed the connection (the answer is then written to nobody), so a
//! search queued behind others would still be run for a client that gave up long ago: in
//! an abort flood, the pool would spend its time on dead requests. Each connection keeps a
//! duplicate of its socket; a search thread peeks at it before starting: end of stream or
//! a reset means nobody will read the answer.

use std::any::Any;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use actix_web::dev::Extensions;

/// A duplicate of a connection's socket, only ever peeked at.
#[derive(Debug)]
pub struct ClientSocket(OwnedFd);

impl ClientSocket {
    /// Duplicates the socket of a TCP connection (`None` for another transport, or when the
    /// process is out of descriptors: the search then simply runs).
    pub fn of_connection(connection: &dyn Any) -> Option<Self> {
        let stream = connection.downcast_ref::<actix_web::rt::net::TcpStream>()?;
        // SAFETY: fcntl on a descriptor we borrow; a non-negative result is a new
        // descriptor that we own from here on.
        let fd = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        // SAFETY: `fd` was just returned by F_DUPFD_CLOEXEC and is owned by nobody else.
        (fd >= 0).then(|| Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// True when the peer has closed its side (end of stream) or reset the connection.
    /// Unread bytes (a pipelined request) or nothing to read yet mean it is still there.
    pub fn has_gone(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: a one-byte peek into a live stack byte; the descriptor is ours and open.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        match n {
            0 => true,
            n if n > 0 => false,
            _ => !matches!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EAGAIN | libc::EINTR)),
        }
    }
}

/// The `on_connect` hook of the server: gives each connection its probe.
pub fn remember_socket(connection: &dyn Any, data: &mut Extensions) {
    if let Some(socket) = ClientSocket::of_connection(connection) {
        data.insert(Arc::new(socket));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream};

    use super::*;

    #[test]
    fn a_closed_peer_has_gone_and_a_quiet_or_talking_one_has_not() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        // The probe works on any socket; from_raw_fd on a dup stands in for actix's stream.
        let fd = unsafe { libc::fcntl(server.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        let probe = ClientSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        assert!(!probe.has_gone());
        client.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        assert!(!probe.has_gone());
        client.shutdown(Shutdown::Both).unwrap();
        drop(client);
        // The unread request line comes first; once read, the end of stream shows.
        let mut buf = [0u8; 64];
        let _ = std::io::Read::read(&mut &server, &mut buf).unwrap();
        assert!(probe.has_gone());
    }
}
