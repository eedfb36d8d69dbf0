//! The client connection under a request, as far as handlers need it.
//!
//! hyper owns a connection's I/O while it serves it. [`ConnectionIo`] is what it is given: the
//! socket, shared, so that a request can still ask the kernel about its own connection through
//! the [`Connection`] extension (whether the client has stopped sending; writing an interim
//! `1xx` response, which hyper's server cannot send) without keeping the socket open once hyper
//! is done with it.

use std::{
    io,
    os::fd::AsRawFd,
    pin::Pin,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
};

use crate::uploads::ClientLink;

/// The socket, and whether hyper has output it could not write yet.
#[derive(Debug)]
struct Socket {
    stream: TcpStream,
    /// hyper's last write found the socket full: it holds bytes that must go out first.
    blocked: AtomicBool,
}

/// A connection's socket as hyper reads and writes it.
pub struct ConnectionIo {
    socket: Arc<Socket>,
}

impl ConnectionIo {
    /// The socket of an accepted connection, and the handle its requests carry.
    pub fn new(stream: TcpStream) -> (Self, Connection) {
        let socket = Arc::new(Socket { stream, blocked: AtomicBool::new(false) });
        let connection = Connection { socket: Arc::downgrade(&socket) };
        (Self { socket }, connection)
    }

    fn stream(&self) -> &TcpStream {
        &self.socket.stream
    }

    fn wrote<T>(&self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.socket.blocked.store(result.is_pending(), Ordering::Release);
        result
    }
}

impl AsyncRead for ConnectionIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.stream().poll_read_ready(cx))?;
            // SAFETY: only the kernel writes here, and `assume_init` covers no more than it wrote.
            let unfilled = unsafe { buf.unfilled_mut() };
            let read = self.stream().try_io(Interest::READABLE, || {
                // SAFETY: the kernel writes at most `len` bytes into the buffer; nothing reads
                // the uninitialised memory.
                let n =
                    unsafe { libc::recv(self.stream().as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len(), 0) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            });
            match read {
                Ok(n) => {
                    // SAFETY: the kernel initialised the first `n` bytes of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ConnectionIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let result = loop {
            match self.stream().poll_write_ready(cx) {
                Poll::Pending => break Poll::Pending,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => match self.stream().try_write(data) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    result => break Poll::Ready(result),
                },
            }
        };
        self.wrote(result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = loop {
            match self.stream().poll_write_ready(cx) {
                Poll::Pending => break Poll::Pending,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => match self.stream().try_write_vectored(data) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    result => break Poll::Ready(result),
                },
            }
        };
        self.wrote(result)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: the descriptor is open while `self.socket` is.
        let rc = unsafe { libc::shutdown(self.stream().as_raw_fd(), libc::SHUT_WR) };
        if rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Ready(Err(io::Error::last_os_error()))
        }
    }
}

/// A request's handle on its connection (a request extension). It does not keep the socket
/// open: once hyper has dropped the connection, the client is taken to have stopped sending.
#[derive(Clone, Debug)]
pub struct Connection {
    socket: Weak<Socket>,
}

impl Connection {
    /// Writes an interim response (`HTTP/1.1 1xx …\r\n…\r\n\r\n`) on the connection. Only
    /// while hyper writes nothing for this request: in the handler, before its body is read
    /// (hyper sends `100 Continue` when the body is first read, and the final response once the
    /// handler is done). False when it was not sent: the connection is gone, or hyper still has
    /// output of an earlier response waiting for room, which must go first.
    pub async fn send_interim(&self, response: &[u8]) -> bool {
        let Some(socket) = self.socket.upgrade() else {
            return false;
        };
        if socket.blocked.load(Ordering::Acquire) {
            return false;
        }
        let mut rest = response;
        while !rest.is_empty() {
            match socket.stream.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                // Nothing written yet: leave it out rather than wait for the client.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && rest.len() == response.len() => return false,
                // Begun: it must be finished before anything else goes out.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if socket.stream.writable().await.is_err() {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        true
    }
}

impl ClientLink for Connection {
    fn stopped_sending(&self) -> bool {
        let Some(socket) = self.socket.upgrade() else {
            return true;
        };
        // Asks the kernel, not the reactor: the client's FIN or RST counts the moment it has
        // arrived, even while bytes sent before it still wait to be read.
        let mut poll = libc::pollfd { fd: socket.stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd, no waiting; the descriptor is open while `socket` is.
        let rc = unsafe { libc::poll(&mut poll, 1, 0) };
        rc > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }
}
