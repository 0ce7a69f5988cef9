//! The connection a migration stream travels on: a Unix or TCP socket,
//! with timeouts so that a peer that stops talking cannot hold us forever.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::{MigrationError, MigrationUri};

/// How long connecting to a destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected migration socket.
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    /// Connects to a destination listening at `uri` (not `file:`).
    pub fn connect(uri: &MigrationUri) -> Result<Self, MigrationError> {
        let io = |e| MigrationError::Io {
            what: "cannot connect to the destination",
            source: e,
        };
        match uri {
            MigrationUri::Unix(path) => UnixStream::connect(path).map(Conn::Unix).map_err(io),
            MigrationUri::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for the host");
                for addr in (host.as_str(), *port).to_socket_addrs().map_err(io)? {
                    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            return Ok(Conn::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(io(last))
            }
            MigrationUri::File(_) => unreachable!("a state file is not a connection"),
        }
    }

    /// Sets how long a send or a receive may block.
    pub fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Conn::Unix(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))
            }
        }
    }

    /// A second handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    /// A duplicate descriptor, for a cancel to shut the socket down.
    pub fn dup_fd(&self) -> io::Result<OwnedFd> {
        self.as_fd().try_clone_to_owned()
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Unix(s) => s.as_fd(),
            Conn::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// A destination's listening socket.
pub enum Listener {
    /// Bound at this path, removed again when dropped.
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Listens at `uri` (not `file:`); a Unix socket's stale file is
    /// replaced only if nobody listens on it, and any other file at the
    /// path is left alone (an error).
    pub fn bind(uri: &MigrationUri) -> Result<Self, MigrationError> {
        let io = |e| MigrationError::Io {
            what: "cannot listen for the incoming migration",
            source: e,
        };
        match uri {
            MigrationUri::Unix(path) => {
                use base::socket::StaleError;
                match base::socket::remove_stale(path) {
                    Ok(()) => {}
                    Err(StaleError::InUse) => {
                        return Err(io(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("something already listens on {}", path.display()),
                        )))
                    }
                    Err(e) => {
                        return Err(io(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{}: {e}", path.display()),
                        )))
                    }
                }
                base::socket::listen_unix(path)
                    .map(|l| Listener::Unix(l, path.clone()))
                    .map_err(io)
            }
            MigrationUri::Tcp { host, port } => TcpListener::bind((host.as_str(), *port))
                .map(Listener::Tcp)
                .map_err(io),
            MigrationUri::File(_) => unreachable!("a state file is not a connection"),
        }
    }

    /// Waits for the source.
    pub fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_destination_takes_a_stale_socket_but_never_another_file() {
        let dir = std::env::temp_dir().join(format!("mig-listen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("in.sock");
        // A socket left by a destination that is gone is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let listener = Listener::bind(&MigrationUri::Unix(path.clone())).unwrap();
        UnixStream::connect(&path).unwrap();
        drop(listener);
        // A user's file at the path is an error and stays as it was.
        std::fs::write(&path, b"notes").unwrap();
        let Err(err) = Listener::bind(&MigrationUri::Unix(path.clone())) else {
            panic!("a regular file was taken over");
        };
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"notes");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
