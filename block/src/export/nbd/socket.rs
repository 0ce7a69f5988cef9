//! A connected stream socket (Unix or TCP), read and written with the few
//! system calls the NBD threads' seccomp list allows: `recvfrom`,
//! `sendto` (never `SIGPIPE`), `poll`, `shutdown`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// A connected socket.
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    /// Wraps a connected stream socket.
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Reads some bytes; 0 at the end of the stream.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Writes all of `buf`; `more` tells the kernel more follows at once.
    pub fn send_all(&self, mut buf: &[u8], more: bool) -> io::Result<()> {
        let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
        while !buf.is_empty() {
            // SAFETY: `buf` is valid for reads of its length.
            let n =
                unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n as usize..];
        }
        Ok(())
    }

    /// Ends both directions: a thread blocked on it wakes with an end of
    /// stream or an error. The descriptor stays open until dropped.
    pub fn shutdown(&self) {
        // SAFETY: shutdown on a descriptor we own; failure (not
        // connected any more) leaves nothing to do.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Turns off Nagle's delay (TCP only; harmless failure elsewhere).
    pub fn no_delay(&self) {
        let one: libc::c_int = 1;
        // SAFETY: a valid int option for the call's duration.
        unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }

    /// The raw descriptor, for polling.
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// Waits until `fds` (with `events`) are ready or `timeout` passes;
/// returns each one's `revents`.
pub fn poll(fds: &[(i32, i16)], timeout: Option<Duration>) -> io::Result<Vec<i16>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    // SAFETY: `pfds` is a valid array of its length for the call.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(pfds.iter().map(|p| p.revents).collect())
}

/// A socket read with a deadline (the handshake must end in time) and
/// written as it is.
pub struct Timed<'a> {
    socket: &'a Socket,
    deadline: Instant,
}

impl<'a> Timed<'a> {
    /// `socket`, whose reads fail with `TimedOut` after `limit` in all.
    pub fn new(socket: &'a Socket, limit: Duration) -> Self {
        Self {
            socket,
            deadline: Instant::now() + limit,
        }
    }
}

impl io::Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let ready = poll(&[(self.socket.fd(), libc::POLLIN)], Some(left))?;
            if ready[0] != 0 {
                return self.socket.recv(buf);
            }
        }
    }
}

impl io::Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.socket.send_all(buf, false)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
